//! Per-client token buckets in a bounded map. A bucket that has refilled to `burst` is the same as
//! no bucket, so when the map is full those go first; if that frees nothing, the least recently
//! used tenth goes (a client evicted that way starts again with a full bucket, which is the price
//! of bounded memory under a flood of distinct clients).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;
use tokio::time::Instant;

#[derive(Debug)]
pub struct ClientLimiter {
    rate: f64,
    burst: f64,
    max_clients: usize,
    buckets: Mutex<HashMap<String, (f64, Instant)>>,
}

impl ClientLimiter {
    pub fn new(requests_per_second: f64, burst: u32, max_clients: u32) -> Self {
        ClientLimiter {
            rate: requests_per_second,
            burst: f64::from(burst),
            max_clients: max_clients.max(1) as usize,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes a token from `client`'s bucket, or says how long until one is back.
    pub fn try_take(&self, client: &str) -> Result<(), Duration> {
        let now = Instant::now();
        let mut map = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        if !map.contains_key(client) && map.len() >= self.max_clients {
            self.evict(&mut map, now);
        }
        let (tokens, last) = map.get(client).copied().unwrap_or((self.burst, now));
        let tokens = (tokens + now.saturating_duration_since(last).as_secs_f64() * self.rate)
            .min(self.burst);
        if tokens >= 1.0 {
            map.insert(client.to_string(), (tokens - 1.0, now));
            Ok(())
        } else {
            map.insert(client.to_string(), (tokens, now));
            Err(Duration::from_secs_f64((1.0 - tokens) / self.rate))
        }
    }

    fn evict(&self, map: &mut HashMap<String, (f64, Instant)>, now: Instant) {
        let full = |(tokens, last): &(f64, Instant)| {
            tokens + now.saturating_duration_since(*last).as_secs_f64() * self.rate >= self.burst
        };
        map.retain(|_, b| !full(b));
        if map.len() < self.max_clients {
            return;
        }
        let mut lasts: Vec<Instant> = map.values().map(|(_, l)| *l).collect();
        let cut = (self.max_clients / 10).max(1).min(lasts.len() - 1);
        let (_, nth, _) = lasts.select_nth_unstable(cut);
        let nth = *nth;
        map.retain(|_, (_, l)| *l > nth);
    }

    pub fn len(&self) -> usize {
        self.buckets.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn each_client_has_its_own_bucket() {
        let l = ClientLimiter::new(1.0, 2, 100);
        assert!(l.try_take("a").is_ok());
        assert!(l.try_take("a").is_ok());
        let wait = l.try_take("a").unwrap_err();
        assert_eq!(wait, Duration::from_secs(1));
        assert!(
            l.try_take("b").is_ok(),
            "another client is not limited by a"
        );
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(l.try_take("a").is_ok());
        assert!(l.try_take("a").is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn the_map_stays_bounded() {
        let l = ClientLimiter::new(1.0, 1, 10);
        // "busy" spends its only token; nine others do too.
        assert!(l.try_take("busy").is_ok());
        for i in 0..9 {
            tokio::time::advance(Duration::from_millis(1)).await;
            assert!(l.try_take(&format!("c{i}")).is_ok());
        }
        assert_eq!(l.len(), 10);
        // A flood of new clients never grows the map past its bound.
        for i in 0..1000 {
            tokio::time::advance(Duration::from_micros(10)).await;
            let _ = l.try_take(&format!("new{i}"));
            assert!(l.len() <= 10);
        }
        // Refilled buckets are dropped first: after 2 s every bucket is full again.
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(l.try_take("late").is_ok());
        assert_eq!(l.len(), 1);
    }
}
