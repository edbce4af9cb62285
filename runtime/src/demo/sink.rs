//! The demo's HTTP sink: it answers after a fixed latency, and records every arrival,
//! which order it carried (`{"order":N}`), and how many requests it held at once.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;

/// What the sink saw.
#[derive(Debug)]
pub struct Seen {
    latency: Duration,
    /// Start instants of the requests, in arrival order.
    arrivals: Mutex<Vec<Instant>>,
    /// Deliveries per order id.
    orders: Mutex<Vec<u32>>,
    /// Bodies that carried no order id the demo produced.
    pub foreign: AtomicU32,
    now: AtomicU32,
    /// The most at once since the last [`Seen::take_peak`].
    peak: AtomicU32,
    /// The most at once ever.
    pub most: AtomicU32,
}

impl Seen {
    /// Arrivals since the start, sorted.
    pub fn arrivals(&self) -> Vec<Instant> {
        let mut v = lock(&self.arrivals).clone();
        v.sort();
        v
    }

    pub fn delivered(&self) -> u64 {
        lock(&self.arrivals).len() as u64
    }

    /// (distinct orders delivered, deliveries beyond the first of each).
    pub fn unique_and_duplicates(&self) -> (u64, u64) {
        let o = lock(&self.orders);
        let unique = o.iter().filter(|n| **n > 0).count() as u64;
        let dup = o.iter().map(|n| u64::from(n.saturating_sub(1))).sum();
        (unique, dup)
    }

    /// Deliveries beyond the first, by the partition the demo produced each order to
    /// (order `i` went to partition `i % partitions`).
    pub fn duplicates_by_partition(&self, partitions: usize) -> Vec<u64> {
        let mut by = vec![0; partitions.max(1)];
        for (i, n) in lock(&self.orders).iter().enumerate() {
            by[i % partitions.max(1)] += u64::from(n.saturating_sub(1));
        }
        by
    }

    /// The most requests held at once since the last call.
    pub fn take_peak(&self) -> u32 {
        self.peak
            .swap(self.now.load(Ordering::SeqCst), Ordering::SeqCst)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Counts a request as held until it is dropped: answered, or cancelled because the
/// client went away (a replica SIGKILLed or stopped mid-request).
struct Held(Arc<Seen>);

impl Drop for Held {
    fn drop(&mut self) {
        self.0.now.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn handle(State(s): State<Arc<Seen>>, body: Bytes) -> &'static str {
    let now = s.now.fetch_add(1, Ordering::SeqCst) + 1;
    let _held = Held(s.clone());
    s.peak.fetch_max(now, Ordering::SeqCst);
    s.most.fetch_max(now, Ordering::SeqCst);
    lock(&s.arrivals).push(Instant::now());
    let order = std::str::from_utf8(&body)
        .ok()
        .and_then(|b| b.strip_prefix("{\"order\":"))
        .and_then(|b| b.strip_suffix('}'))
        .and_then(|n| n.parse::<usize>().ok());
    {
        let mut orders = lock(&s.orders);
        match order.and_then(|i| orders.get_mut(i)) {
            Some(n) => *n += 1,
            None => {
                s.foreign.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    tokio::time::sleep(s.latency).await;
    ""
}

/// Serves the sink on a loopback port for orders `0..orders`; returns its URL.
pub async fn start(latency: Duration, orders: usize) -> std::io::Result<(String, Arc<Seen>)> {
    let seen = Arc::new(Seen {
        latency,
        arrivals: Mutex::new(Vec::new()),
        orders: Mutex::new(vec![0; orders]),
        foreign: AtomicU32::new(0),
        now: AtomicU32::new(0),
        peak: AtomicU32::new(0),
        most: AtomicU32::new(0),
    });
    let app = axum::Router::new()
        .route("/", axum::routing::post(handle))
        .with_state(seen.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/", listener.local_addr()?);
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok((url, seen))
}
