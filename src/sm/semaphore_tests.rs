//! Semaphore tests (being written).
