//! Unit tests of `concord bench`: the histogram and its percentiles, base64, the etcd request
//! bodies and error codes, argument parsing, open-loop accounting, and whole runs against a
//! small fake of etcd's v3 JSON gateway.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use axum::{Json, Router};
use clap::Parser;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

use super::*;

// ---------------------------------------------------------------------------------------
// Histogram
// ---------------------------------------------------------------------------------------

/// The exact quantile of sorted samples, with the rank rule the histogram uses.
fn exact(sorted: &[u64], q: f64) -> u64 {
    let n = sorted.len() as u64;
    let rank = ((q * n as f64).ceil() as u64).clamp(1, n);
    sorted[(rank - 1) as usize]
}

#[test]
fn histogram_is_exact_for_small_values() {
    let mut h = Histogram::new();
    for v in 1..=100 {
        h.record(v);
    }
    assert_eq!(h.count(), 100);
    assert_eq!(h.min(), 1);
    assert_eq!(h.max(), 100);
    assert_eq!(h.quantile(0.5), 50);
    assert_eq!(h.quantile(0.9), 90);
    assert_eq!(h.quantile(0.99), 99);
    assert_eq!(h.quantile(1.0), 100);
    assert_eq!(h.quantile(0.0), 1);
    assert!((h.mean() - 50.5).abs() < 1e-9);
}

#[test]
fn empty_histogram_answers_zero() {
    let h = Histogram::new();
    assert_eq!(h.count(), 0);
    assert_eq!(h.quantile(0.99), 0);
    assert_eq!(h.mean(), 0.0);
}

#[test]
fn buckets_tile_the_whole_u64_range() {
    let last = bucket_of(u64::MAX);
    assert_eq!(bucket_bounds(last).1, u64::MAX);
    assert_eq!(bucket_bounds(0), (0, 0));
    for i in 0..=last {
        let (lo, hi) = bucket_bounds(i);
        assert!(lo <= hi, "bucket {i}: {lo} > {hi}");
        assert_eq!(bucket_of(lo), i, "low end of bucket {i}");
        assert_eq!(bucket_of(hi), i, "high end of bucket {i}");
        if i < last {
            assert_eq!(bucket_bounds(i + 1).0, hi + 1, "gap after bucket {i}");
        }
        // The relative width bound that the quantile error rests on.
        assert!(
            hi - lo <= lo / SUB_COUNT,
            "bucket {i} too wide: {lo}..={hi}"
        );
    }
}

#[test]
fn quantiles_overstate_by_less_than_one_128th() {
    let mut rng = StdRng::seed_from_u64(7);
    for _round in 0..20 {
        let n = rng.gen_range(1..5000);
        // Log-uniform over 1 us .. ~17 min, like latencies with a long tail.
        let mut samples: Vec<u64> = (0..n)
            .map(|_| 2f64.powf(rng.gen_range(0.0..30.0)) as u64)
            .collect();
        let mut h = Histogram::new();
        for &s in &samples {
            h.record(s);
        }
        samples.sort_unstable();
        let mut previous = 0;
        for q in [0.0, 0.25, 0.5, 0.9, 0.99, 0.999, 1.0] {
            let got = h.quantile(q);
            let want = exact(&samples, q);
            assert!(got >= want, "q {q}: {got} < exact {want}");
            assert!(
                got - want <= want / SUB_COUNT,
                "q {q}: {got} too far above exact {want}"
            );
            assert!(got >= previous, "quantiles must not decrease");
            previous = got;
        }
        assert_eq!(h.quantile(1.0), h.max());
        assert_eq!(h.max(), *samples.last().unwrap());
        assert_eq!(h.min(), samples[0]);
    }
}

#[test]
fn merged_histograms_equal_one_histogram_of_everything() {
    let mut rng = StdRng::seed_from_u64(11);
    let samples: Vec<u64> = (0..3000).map(|_| rng.gen_range(0..10_000_000)).collect();
    let mut whole = Histogram::new();
    let mut parts = vec![Histogram::new(), Histogram::new(), Histogram::new()];
    for (i, &s) in samples.iter().enumerate() {
        whole.record(s);
        parts[i % 3].record(s);
    }
    let mut merged = Histogram::new();
    merged.merge(&Histogram::new());
    for p in &parts {
        merged.merge(p);
    }
    assert_eq!(merged.count(), whole.count());
    assert_eq!(merged.min(), whole.min());
    assert_eq!(merged.max(), whole.max());
    assert_eq!(merged.mean(), whole.mean());
    for q in [0.5, 0.9, 0.99, 0.999] {
        assert_eq!(merged.quantile(q), whole.quantile(q));
    }
}

// ---------------------------------------------------------------------------------------
// Base64, etcd bodies, error codes
// ---------------------------------------------------------------------------------------

#[test]
fn base64_matches_rfc_4648_vectors() {
    let vectors = [
        ("", ""),
        ("f", "Zg=="),
        ("fo", "Zm8="),
        ("foo", "Zm9v"),
        ("foob", "Zm9vYg=="),
        ("fooba", "Zm9vYmE="),
        ("foobar", "Zm9vYmFy"),
    ];
    for (plain, encoded) in vectors {
        assert_eq!(base64_encode(plain.as_bytes()), encoded);
        assert_eq!(base64_decode(encoded).as_deref(), Some(plain.as_bytes()));
    }
    assert_eq!(base64_encode(&[0xfb, 0xff]), "+/8=");
}

#[test]
fn base64_round_trips_and_rejects_malformed_input() {
    let mut rng = StdRng::seed_from_u64(3);
    for len in 0..200usize {
        let data: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
        let enc = base64_encode(&data);
        assert_eq!(enc.len(), len.div_ceil(3) * 4);
        assert_eq!(base64_decode(&enc), Some(data));
    }
    for bad in ["Zg=", "Z===", "Zg==Zg==", "Zm9v!A==", "Zm=v", "===="] {
        assert_eq!(base64_decode(bad), None, "{bad:?} must be rejected");
    }
}

#[test]
fn etcd_bodies_carry_base64_keys_values_and_names() {
    let value_b64 = base64_encode(b"bar");
    assert_eq!(
        etcd::put("foo", &value_b64),
        json!({"key": "Zm9v", "value": "YmFy"})
    );
    assert_eq!(etcd::range("foo", false), json!({"key": "Zm9v"}));
    assert_eq!(
        etcd::range("foo", true),
        json!({"key": "Zm9v", "serializable": true})
    );
    assert_eq!(
        etcd::lock("bench-lock", 7587848364414434055),
        json!({"name": base64_encode(b"bench-lock"), "lease": "7587848364414434055"})
    );
    assert_eq!(etcd::unlock("a2V5"), json!({"key": "a2V5"}));
    assert_eq!(etcd::lease(42), json!({"ID": "42"}));
    // TTLs are whole seconds, rounded up.
    assert_eq!(etcd::grant(10_000), json!({"TTL": 10}));
    assert_eq!(etcd::grant(1_500), json!({"TTL": 2}));
}

#[test]
fn etcd_ids_come_as_strings_or_numbers() {
    assert_eq!(
        id_field(&json!("7587848364414434055")),
        Some(7587848364414434055)
    );
    assert_eq!(id_field(&json!(12)), Some(12));
    assert_eq!(id_field(&json!("x")), None);
    assert_eq!(id_field(&Value::Null), None);
}

#[test]
fn error_codes_by_target() {
    let etcd = Target::Etcd;
    let unary = json!({"error": "etcdserver: requested lease not found", "code": 5,
        "message": "etcdserver: requested lease not found"});
    assert_eq!(etcd.error_code(404, &unary), "not_found");
    let stream = json!({"error": {"grpc_code": 14, "http_code": 503, "message": "x"}});
    assert_eq!(etcd.error_code(503, &stream), "unavailable");
    assert_eq!(etcd.error_code(404, &Value::Null), "http_404");
    let concord = Target::Concord;
    let held = json!({"error": {"code": "lock_held", "message": "held"}});
    assert_eq!(concord.error_code(409, &held), "lock_held");
    assert_eq!(concord.error_code(502, &json!("bad gateway")), "http_502");
    assert_eq!(grpc_code_name(4), "deadline_exceeded");
    assert_eq!(grpc_code_name(99), "grpc_other");
}

#[test]
fn concord_requests_use_the_api_paths() {
    let (path, body) = concord::put("bench/ab/k7", "v");
    assert_eq!(path, "/v1/kv/bench/ab/k7");
    assert_eq!(body["value"], "v");
    assert!(body["request_id"].is_string());
    assert_eq!(concord::get_path("bench/k1", false), "/v1/kv/bench/k1");
    assert_eq!(
        concord::get_path("bench/k1", true),
        "/v1/kv/bench/k1?consistency=stale"
    );
    let (path, body) = concord::acquire("semaphores", "s", 9);
    assert_eq!(path, "/v1/semaphores/s/acquire");
    assert_eq!(body["permits"], 1);
    assert_eq!(body["lease_id"], 9);
    let (path, body) = concord::acquire("locks", "l", 9);
    assert_eq!(path, "/v1/locks/l/acquire");
    assert!(body.get("permits").is_none());
    assert_eq!(body["wait_ms"], ACQUIRE_WAIT_MS);
    let (path, _) = concord::release("locks", "l", 9);
    assert_eq!(path, "/v1/locks/l/release");
}

// ---------------------------------------------------------------------------------------
// Arguments
// ---------------------------------------------------------------------------------------

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    args: BenchArgs,
}

fn parse(argv: &[&str]) -> Result<BenchArgs, String> {
    let argv = std::iter::once("bench").chain(argv.iter().copied());
    Cli::try_parse_from(argv)
        .map(|c| c.args)
        .map_err(|e| e.to_string())
}

#[test]
fn defaults_are_a_closed_loop_put_run() {
    let a = parse(&[]).unwrap();
    assert_eq!(a.workload, Workload::Put);
    assert_eq!(a.target, Target::Concord);
    assert_eq!(a.clients, 16);
    assert_eq!(a.duration, Duration::from_secs(10));
    assert_eq!(a.warmup, Duration::from_secs(2));
    assert_eq!(a.value_size, 256);
    assert_eq!(a.rate, None);
    assert!(!a.leader_only);
    assert!(!a.shared_pool);
    assert!(a.validate().is_ok());
}

#[test]
fn every_flag_parses() {
    let a = parse(&[
        "--workload",
        "lock-contended",
        "--clients",
        "8",
        "--duration",
        "1500ms",
        "--warmup",
        "0s",
        "--value-size",
        "100",
        "--keys",
        "50",
        "--rate",
        "250.5",
        "--leader-only",
        "--target",
        "etcd",
        "--shared-pool",
        "--timeout",
        "3s",
        "--cpu-pids",
        "41,42",
    ])
    .unwrap();
    assert_eq!(a.workload, Workload::LockContended);
    assert_eq!(a.clients, 8);
    assert_eq!(a.duration, Duration::from_millis(1500));
    assert_eq!(a.warmup, Duration::ZERO);
    assert_eq!(a.value_size, 100);
    assert_eq!(a.keys, 50);
    assert_eq!(a.rate, Some(250.5));
    assert!(a.leader_only && a.shared_pool);
    assert_eq!(a.target, Target::Etcd);
    assert_eq!(a.timeout, Duration::from_secs(3));
    assert_eq!(a.cpu_pids, [41, 42]);
    for (w, want) in [
        ("put", Workload::Put),
        ("get", Workload::Get),
        ("get-stale", Workload::GetStale),
        ("lock", Workload::Lock),
        ("semaphore", Workload::Semaphore),
        ("lease", Workload::Lease),
    ] {
        assert_eq!(parse(&["--workload", w]).unwrap().workload, want);
    }
}

#[test]
fn bad_arguments_are_refused() {
    for argv in [
        &["--workload", "scan"][..],
        &["--clients", "0"],
        &["--rate", "0"],
        &["--rate", "-5"],
        &["--rate", "fast"],
        &["--rate", "inf"],
        &["--duration", "soon"],
        &["--value-size", "0"],
        &["--value-size", "600000"],
        &["--target", "zookeeper"],
    ] {
        assert!(parse(argv).is_err(), "{argv:?} must be refused");
    }
    let zero = parse(&["--duration", "0s"]).unwrap();
    assert!(zero.validate().is_err());
    let long = parse(&["--duration", "23h", "--warmup", "1m"]).unwrap();
    assert!(long.validate().is_err());
}

// ---------------------------------------------------------------------------------------
// Open-loop accounting
// ---------------------------------------------------------------------------------------

#[test]
fn unsent_sends_count_the_schedule_left_in_the_window() {
    let t0 = Instant::now();
    let ms = Duration::from_millis;
    // Sends at 0, 10, ..., 90 are left before the end at 100: ten of them.
    assert_eq!(unsent_sends(t0, ms(10), t0, t0 + ms(100)), 10);
    // Only those at or after the warm-up end (50) count.
    assert_eq!(unsent_sends(t0, ms(10), t0 + ms(50), t0 + ms(100)), 5);
    assert_eq!(unsent_sends(t0, ms(10), t0 + ms(55), t0 + ms(100)), 4);
    assert_eq!(unsent_sends(t0 + ms(100), ms(10), t0, t0 + ms(100)), 0);
}

// ---------------------------------------------------------------------------------------
// A fake etcd v3 JSON gateway
// ---------------------------------------------------------------------------------------

#[derive(Default)]
struct FakeEtcd {
    kv: BTreeMap<Vec<u8>, Vec<u8>>,
    leases: BTreeSet<u64>,
    next_lease: u64,
    /// Lock name -> the key of its holder.
    held: BTreeMap<Vec<u8>, Vec<u8>>,
    calls: BTreeMap<&'static str, u64>,
    serializable_ranges: u64,
    /// What the fake found wrong with a request.
    bad: Vec<String>,
    /// Answer every put with gRPC `unavailable`.
    fail_puts: bool,
}

type Fake = Arc<Mutex<FakeEtcd>>;

fn lock(f: &Fake) -> std::sync::MutexGuard<'_, FakeEtcd> {
    f.lock().unwrap()
}

fn grpc_error(status: StatusCode, code: u64, message: &str) -> (StatusCode, Json<Value>) {
    (
        status,
        Json(json!({"error": message, "code": code, "message": message})),
    )
}

fn ok(v: Value) -> (StatusCode, Json<Value>) {
    (StatusCode::OK, Json(v))
}

/// A base64 field, noting what is wrong with it.
fn field(st: &mut FakeEtcd, body: &Value, name: &str) -> Option<Vec<u8>> {
    let decoded = body[name].as_str().and_then(base64_decode);
    if decoded.is_none() {
        st.bad.push(format!("{name} is not base64 in {body}"));
    }
    decoded
}

async fn fake_put(State(f): State<Fake>, Json(body): Json<Value>) -> (StatusCode, Json<Value>) {
    let mut st = lock(&f);
    *st.calls.entry("put").or_default() += 1;
    if st.fail_puts {
        return grpc_error(StatusCode::SERVICE_UNAVAILABLE, 14, "etcdserver: no leader");
    }
    let (Some(k), Some(v)) = (field(&mut st, &body, "key"), field(&mut st, &body, "value")) else {
        return grpc_error(StatusCode::BAD_REQUEST, 3, "bad put");
    };
    st.kv.insert(k, v);
    ok(json!({"header": {"revision": "1"}}))
}

async fn fake_range(State(f): State<Fake>, Json(body): Json<Value>) -> (StatusCode, Json<Value>) {
    let mut st = lock(&f);
    *st.calls.entry("range").or_default() += 1;
    if body["serializable"] == json!(true) {
        st.serializable_ranges += 1;
    }
    let Some(k) = field(&mut st, &body, "key") else {
        return grpc_error(StatusCode::BAD_REQUEST, 3, "bad range");
    };
    match st.kv.get(&k) {
        Some(v) => ok(
            json!({"kvs": [{"key": base64_encode(&k), "value": base64_encode(v)}],
            "count": "1"}),
        ),
        None => {
            st.bad.push(format!("range of a missing key {k:?}"));
            ok(json!({"header": {}}))
        }
    }
}

async fn fake_grant(State(f): State<Fake>, Json(body): Json<Value>) -> (StatusCode, Json<Value>) {
    let mut st = lock(&f);
    *st.calls.entry("grant").or_default() += 1;
    if body["TTL"].as_u64().is_none_or(|t| t == 0) {
        st.bad.push(format!("grant without a TTL: {body}"));
    }
    st.next_lease += 1;
    // Big ids, as etcd's are: they must survive as strings.
    let id = (1u64 << 62) + st.next_lease;
    st.leases.insert(id);
    ok(json!({"ID": id.to_string(), "TTL": body["TTL"].to_string()}))
}

fn lease_of(st: &FakeEtcd, v: &Value) -> Option<u64> {
    v.as_str()?.parse().ok().filter(|id| st.leases.contains(id))
}

async fn fake_keepalive(
    State(f): State<Fake>,
    Json(body): Json<Value>,
) -> (StatusCode, Json<Value>) {
    let mut st = lock(&f);
    *st.calls.entry("keepalive").or_default() += 1;
    match lease_of(&st, &body["ID"]) {
        Some(id) => ok(json!({"result": {"ID": id.to_string(), "TTL": "10"}})),
        // etcd answers an unknown lease with TTL 0 (left out), not an error.
        None => ok(json!({"result": {"ID": body["ID"]}})),
    }
}

/// Only the pre-3.3 path exists here, so revokes must fall back to it.
async fn fake_legacy_revoke(
    State(f): State<Fake>,
    Json(body): Json<Value>,
) -> (StatusCode, Json<Value>) {
    let mut st = lock(&f);
    *st.calls.entry("revoke").or_default() += 1;
    let Some(id) = lease_of(&st, &body["ID"]) else {
        return grpc_error(StatusCode::NOT_FOUND, 5, "requested lease not found");
    };
    st.leases.remove(&id);
    st.held
        .retain(|_, key| !key.ends_with(format!("/{id:x}").as_bytes()));
    ok(json!({"header": {}}))
}

async fn fake_lock(State(f): State<Fake>, Json(body): Json<Value>) -> (StatusCode, Json<Value>) {
    loop {
        {
            let mut st = lock(&f);
            let Some(name) = field(&mut st, &body, "name") else {
                return grpc_error(StatusCode::BAD_REQUEST, 3, "bad lock");
            };
            let Some(lease) = lease_of(&st, &body["lease"]) else {
                st.bad.push(format!("lock with an unknown lease: {body}"));
                return grpc_error(StatusCode::NOT_FOUND, 5, "requested lease not found");
            };
            if !st.held.contains_key(&name) {
                *st.calls.entry("lock").or_default() += 1;
                let mut key = name.clone();
                key.extend_from_slice(format!("/{lease:x}").as_bytes());
                st.held.insert(name, key.clone());
                return ok(json!({"key": base64_encode(&key)}));
            }
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

async fn fake_unlock(State(f): State<Fake>, Json(body): Json<Value>) -> (StatusCode, Json<Value>) {
    let mut st = lock(&f);
    *st.calls.entry("unlock").or_default() += 1;
    let Some(key) = field(&mut st, &body, "key") else {
        return grpc_error(StatusCode::BAD_REQUEST, 3, "bad unlock");
    };
    let before = st.held.len();
    st.held.retain(|_, k| *k != key);
    if st.held.len() == before {
        st.bad
            .push(format!("unlock of a key nobody holds: {key:?}"));
    }
    ok(json!({"header": {}}))
}

async fn fake_status(State(_): State<Fake>, Json(_): Json<Value>) -> (StatusCode, Json<Value>) {
    // uint64 ids, as decimal strings (proto3 JSON).
    ok(json!({"header": {"member_id": "9372538179322589801"}, "leader": "9372538179322589801"}))
}

/// Serve the fake on a loopback port; its address and state.
async fn fake_etcd() -> (String, Fake) {
    let fake: Fake = Arc::default();
    let app = Router::new()
        .route("/v3/kv/put", post(fake_put))
        .route("/v3/kv/range", post(fake_range))
        .route("/v3/lease/grant", post(fake_grant))
        .route("/v3/lease/keepalive", post(fake_keepalive))
        .route("/v3/kv/lease/revoke", post(fake_legacy_revoke))
        .route("/v3/lock/lock", post(fake_lock))
        .route("/v3/lock/unlock", post(fake_unlock))
        .route("/v3/maintenance/status", post(fake_status))
        .with_state(fake.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (addr, fake)
}

fn etcd_args(workload: &str, extra: &[&str]) -> BenchArgs {
    let mut argv = vec![
        "--target",
        "etcd",
        "--workload",
        workload,
        "--clients",
        "4",
        "--warmup",
        "100ms",
        "--duration",
        "300ms",
        "--keys",
        "20",
        "--value-size",
        "100",
    ];
    argv.extend_from_slice(extra);
    parse(&argv).unwrap()
}

fn assert_clean(r: &Report) {
    assert!(r.ops > 0, "no ops: {r:?}");
    assert!(r.errors.is_empty(), "errors: {:?}", r.errors);
    assert_eq!(r.error_count, 0);
    let (p50, p90, p99, max) = (
        r.p50_ms.unwrap(),
        r.p90_ms.unwrap(),
        r.p99_ms.unwrap(),
        r.max_ms.unwrap(),
    );
    assert!(
        0.0 <= p50 && p50 <= p90 && p90 <= p99 && p99 <= max,
        "{r:?}"
    );
    assert!(r.duration_s >= 0.3, "{r:?}");
    assert!((r.throughput - r.ops as f64 / r.duration_s).abs() < 1e-6);
}

#[test]
fn fsync_report_is_the_difference_of_two_samples() {
    let f = FsyncReport::between("http://l".into(), (10, 100), (30, 460)).unwrap();
    assert_eq!((f.fsyncs, f.entries), (20, 360));
    assert_eq!(f.entries_per_fsync, Some(18.0));
    // No fsync in the window: counted, but no ratio.
    let f = FsyncReport::between("http://l".into(), (5, 9), (5, 9)).unwrap();
    assert_eq!((f.fsyncs, f.entries, f.entries_per_fsync), (0, 0, None));
    // A counter that went back means the node restarted: no report.
    assert_eq!(FsyncReport::between("x".into(), (10, 100), (3, 200)), None);
    assert_eq!(FsyncReport::between("x".into(), (10, 100), (12, 50)), None);
}

#[test]
fn a_pool_connects_to_the_endpoints_host_and_port() {
    let addr = |base: &str| Pool::new(base).map(|p| (p.0.addr.clone(), p.0.prefix.clone()));
    assert_eq!(addr("http://h:7700"), Ok(("h:7700".into(), "".into())));
    assert_eq!(addr("http://h"), Ok(("h:80".into(), "".into())));
    assert_eq!(addr("http://[::1]"), Ok(("[::1]:80".into(), "".into())));
    assert_eq!(
        addr("http://[::1]:9/a/b/"),
        Ok(("[::1]:9".into(), "/a/b".into()))
    );
    assert!(addr("https://h:1").unwrap_err().contains("only http://"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_carry_the_path_prefix_and_host_and_reuse_the_connection() {
    async fn echo(headers: axum::http::HeaderMap, body: String) -> Json<Value> {
        let host = headers["host"].to_str().unwrap_or("").to_string();
        Json(json!({"host": host, "body": body}))
    }
    let app = Router::new().route("/pre/echo", post(echo));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move { axum::serve(listener, app).await });
    let conn = Conn::new(
        &format!("http://{addr}/pre/"),
        Target::Concord,
        Duration::from_secs(5),
    )
    .unwrap();
    for i in 0..3 {
        let v = conn.post("/echo", json!({"i": i})).await.unwrap();
        assert_eq!(v["host"], addr.as_str());
        assert_eq!(v["body"], format!("{{\"i\":{i}}}"));
        let idle = conn.pool.0.idle.lock().unwrap().len();
        assert_eq!(
            idle, 1,
            "one connection, back in the pool after each answer"
        );
    }
    assert_eq!(
        conn.post("/nowhere", json!({})).await.unwrap_err(),
        "http_404"
    );
}

#[test]
fn cpu_time_is_read_after_the_command_name_and_reported_per_op() {
    // Field 2 may hold spaces and parentheses; utime and stime are fields 14 and 15.
    let stat = "4242 (tokio (rt) w) S 1 2 3 4 5 6 7 8 9 10 250 30 0 0 20 0 8 0 100";
    assert_eq!(proc_cpu_ms(stat, 100.0), Some(2800.0));
    assert_eq!(proc_cpu_ms(stat, 1000.0), Some(280.0));
    assert_eq!(proc_cpu_ms("4242 (x) S 1 2", 100.0), None, "truncated");
    assert_eq!(proc_cpu_ms("no parenthesis", 100.0), None);

    let sample = |client_ms, servers_ms| CpuSample {
        client_ms,
        servers_ms,
    };
    let c = CpuReport::between(
        sample(100.0, Some(1000.0)),
        sample(300.0, Some(5000.0)),
        2000,
    )
    .unwrap();
    assert_eq!(c.client_ms, 200.0);
    assert_eq!(c.client_us_per_op, Some(100.0));
    assert_eq!(
        (c.servers_ms, c.servers_us_per_op),
        (Some(4000.0), Some(2000.0))
    );
    let c = CpuReport::between(sample(1.0, None), sample(2.0, None), 0).unwrap();
    assert_eq!(
        (c.client_us_per_op, c.servers_ms),
        (None, None),
        "no ops: no rate"
    );
    // A server counter that went back (a pid reused by another process), or a server that
    // could not be read at one end: the generator's figure stays, the servers' goes.
    for (before, after) in [
        (Some(50.0), Some(10.0)),
        (Some(50.0), None),
        (None, Some(9.0)),
    ] {
        let c = CpuReport::between(sample(1.0, before), sample(2.0, after), 5).unwrap();
        assert_eq!(
            (c.client_ms, c.servers_ms, c.servers_us_per_op),
            (1.0, None, None)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_put_and_get_send_base64_keys_and_values() {
    let (addr, fake) = fake_etcd().await;
    let r = run(std::slice::from_ref(&addr), etcd_args("put", &[]))
        .await
        .unwrap();
    assert_clean(&r);
    assert_eq!(r.target, Target::Etcd);
    assert_eq!(r.fsync, None, "etcd has no group-commit counters to read");
    let cpu = r
        .cpu
        .clone()
        .expect("this process's CPU time is read from /proc");
    assert!(cpu.client_ms > 0.0, "{cpu:?}");
    let per_op = cpu.client_ms * 1000.0 / r.ops as f64;
    assert!(
        (cpu.client_us_per_op.unwrap() - per_op).abs() < 1e-9,
        "{cpu:?}"
    );
    assert_eq!((cpu.servers_ms, cpu.servers_us_per_op), (None, None));
    {
        let st = lock(&fake);
        assert!(st.bad.is_empty(), "{:?}", st.bad);
        assert!(!st.kv.is_empty());
        for (k, v) in &st.kv {
            assert!(k.starts_with(b"bench/"), "key {k:?}");
            assert_eq!(v.len(), 100, "values are --value-size bytes");
        }
        assert!(st.calls["put"] >= r.ops);
    }

    // The fake server runs in this process: as a --cpu-pids process it is counted as well.
    let me = std::process::id().to_string();
    let r = run(
        std::slice::from_ref(&addr),
        etcd_args("get", &["--cpu-pids", &me]),
    )
    .await
    .unwrap();
    assert_clean(&r);
    let cpu = r.cpu.clone().unwrap();
    let servers = cpu.servers_ms.expect("--cpu-pids given");
    assert!(servers > 0.0, "{cpu:?}");
    let per_op = servers * 1000.0 / r.ops as f64;
    assert!(
        (cpu.servers_us_per_op.unwrap() - per_op).abs() < 1e-9,
        "{cpu:?}"
    );
    {
        let st = lock(&fake);
        assert!(st.bad.is_empty(), "{:?}", st.bad);
        assert!(st.calls["range"] >= r.ops);
        assert_eq!(st.serializable_ranges, 0, "get is linearizable");
    }

    let r = run(&[addr], etcd_args("get-stale", &["--leader-only"]))
        .await
        .unwrap();
    assert_clean(&r);
    assert!(r.leader_only);
    let st = lock(&fake);
    assert!(st.bad.is_empty(), "{:?}", st.bad);
    assert!(st.serializable_ranges >= r.ops, "get-stale is serializable");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_locks_and_leases_go_through_the_gateway() {
    let (addr, fake) = fake_etcd().await;
    for workload in ["lock", "lock-contended"] {
        let r = run(std::slice::from_ref(&addr), etcd_args(workload, &[]))
            .await
            .unwrap();
        assert_clean(&r);
        assert_eq!(r.unit, "pairs/s");
        let st = lock(&fake);
        assert!(st.bad.is_empty(), "{workload}: {:?}", st.bad);
        assert!(st.calls["lock"] >= r.ops && st.calls["unlock"] >= r.ops);
        assert!(st.held.is_empty(), "{workload}: every lock released");
        assert!(st.leases.is_empty(), "{workload}: client leases revoked");
    }
    let r = run(&[addr], etcd_args("lease", &["--rate", "200"]))
        .await
        .unwrap();
    assert_clean(&r);
    assert_eq!(r.mode, "open");
    assert!(r.unsent.is_some());
    let st = lock(&fake);
    assert!(st.bad.is_empty(), "{:?}", st.bad);
    assert!(st.leases.is_empty(), "every granted lease revoked");
    assert_eq!(st.calls["grant"], st.calls["revoke"]);
    assert!(st.calls["keepalive"] >= r.ops);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_errors_are_counted_by_grpc_code() {
    let (addr, fake) = fake_etcd().await;
    lock(&fake).fail_puts = true;
    let r = run(&[addr], etcd_args("put", &[])).await.unwrap();
    assert_eq!(r.ops, 0);
    assert!(r.failed());
    assert!(r.errors["unavailable"] > 0, "{:?}", r.errors);
    assert_eq!(r.errors.len(), 1, "{:?}", r.errors);
    assert_eq!(r.p50_ms, None);
}

#[tokio::test]
async fn semaphore_is_unsupported_with_etcd_and_sends_nothing() {
    let (addr, fake) = fake_etcd().await;
    let r = run(&[addr], etcd_args("semaphore", &[])).await.unwrap();
    assert!(r.unsupported.is_some());
    assert!(!r.failed());
    assert!(r.human().contains("unsupported"));
    let v = serde_json::to_value(&r).unwrap();
    assert_eq!(v["workload"], "semaphore");
    assert_eq!(v["target"], "etcd");
    assert!(v["unsupported"].is_string());
    assert!(lock(&fake).calls.is_empty());
}

#[tokio::test]
async fn a_dead_endpoint_counts_connect_errors() {
    // A port that was just free: nothing listens there.
    let addr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    };
    let r = run(&[addr], etcd_args("put", &[])).await.unwrap();
    assert_eq!(r.ops, 0);
    assert!(r.errors["connect"] > 0, "{:?}", r.errors);
}

// ---------------------------------------------------------------------------------------
// Set-up retries
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn set_up_steps_retry_while_there_is_no_leader_and_not_other_errors() {
    use std::sync::atomic::AtomicU32;
    let calls = AtomicU32::new(0);
    // Two answers of `no_leader` (an election), then the step succeeds.
    let r = in_parallel(vec![7u64], 1, |i| {
        let n = calls.fetch_add(1, Ordering::SeqCst);
        async move {
            match n {
                0 | 1 => Err("no_leader".to_string()),
                _ => Ok(i * 2),
            }
        }
    })
    .await;
    assert_eq!(r, Ok(vec![14]));
    assert_eq!(calls.load(Ordering::SeqCst), 3);

    // Any other error ends the step at once.
    let calls = AtomicU32::new(0);
    let r: Result<Vec<u64>, String> = in_parallel(vec![1u64, 2], 1, |_| {
        calls.fetch_add(1, Ordering::SeqCst);
        async { Err("lease_not_found".to_string()) }
    })
    .await;
    assert_eq!(r, Err("lease_not_found".to_string()));
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}
