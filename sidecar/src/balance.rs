//! Per-request balancing across a dependency's endpoints, with outlier ejection.
//!
//! - **Choice**: power of two choices over peak-EWMA latency weighted by requests in flight
//!   (Linkerd's balancer): two eligible endpoints drawn at random, the one with the lower
//!   `rtt × (in_flight + 1)` wins. The RTT estimate jumps to any slower observation (peak) and
//!   decays towards faster ones with [`Settings::decay`]; an endpoint never measured is assumed
//!   as fast as its measured peers ([`Settings::default_rtt`] when none is). An estimate of
//!   few answers decays faster (`decay × (n/10)²` after `n < 10` answers): one slow early
//!   answer (a cold app) keeps a new pod out for a fraction of a second, not for half a minute,
//!   and an endpoint measured long keeps the full decay. An answer that waited for a new
//!   connection is timed from when the connection was ready ([`crate::connected_at`]): a
//!   connection's setup (a mutual-TLS handshake) is not the endpoint's latency.
//! - **Slow start**: a new endpoint's `warmth` grows from 0.1 to 1 over [`Settings::slow_start`];
//!   when it wins a draw against a warmer endpoint it takes the request with the chance of its
//!   warmth over the other's (else the other does), so its share ramps up with time; endpoints
//!   that appeared together compete on latency alone. (Dividing its cost by the warmth instead would make it
//!   lose every draw against warm peers as fast as it, until fully warm: a step, not a ramp.)
//! - **Ejection** (Envoy's outlier detection, Linkerd's failure accrual): after
//!   [`Settings::consecutive_failures`] gateway failures in a row (connection refused or reset,
//!   502/503/504, gRPC `UNAVAILABLE`: the caller says which with [`Outcome`]) an endpoint gets no
//!   requests for the base ejection time, doubled at each ejection up to the maximum. At most
//!   [`Settings::max_ejected_percent`] of the endpoints are ejected at once (at least one endpoint
//!   is always left). When its time is up, exactly one real request probes it: success brings it
//!   back, failure ejects it again for longer.
//! - **Retries elsewhere**: [`Balancer::pick`] takes the endpoint to avoid (the one that just
//!   failed); it is chosen only when it is the only one eligible.
//!
//! The endpoint set is replaced as a whole ([`Balancer::update`]) when discovery has a new
//! answer; endpoints that stay keep their state.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
use tokio::time::Instant;
use weir_crds::proxy::{BalanceAlgorithm, LoadBalancerConfig, OutlierDetectionConfig};

/// The knobs, with the defaults `weir render` writes.
#[derive(Clone, Debug, PartialEq)]
pub struct Settings {
    /// Peak-EWMA with two choices, or each endpoint in turn.
    pub algorithm: BalanceAlgorithm,
    /// The RTT an endpoint is assumed to have before its first answer.
    pub default_rtt: Duration,
    /// How fast the estimate forgets a slow answer (the EWMA's time constant).
    pub decay: Duration,
    /// How long a new endpoint takes to get its full share.
    pub slow_start: Duration,
    /// Gateway failures in a row that eject an endpoint.
    pub consecutive_failures: u32,
    /// The first ejection's length; each next one doubles it.
    pub base_ejection: Duration,
    /// The longest ejection.
    pub max_ejection: Duration,
    /// The largest share of endpoints ejected at once, in percent.
    pub max_ejected_percent: u32,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            algorithm: BalanceAlgorithm::PeakEwma,
            default_rtt: Duration::from_millis(30),
            decay: Duration::from_secs(10),
            slow_start: Duration::from_secs(10),
            consecutive_failures: 5,
            base_ejection: Duration::from_secs(30),
            max_ejection: Duration::from_secs(300),
            max_ejected_percent: 50,
        }
    }
}

impl Settings {
    /// The settings of one dependency's config.
    pub fn from_config(lb: &LoadBalancerConfig, od: &OutlierDetectionConfig) -> Settings {
        Settings {
            algorithm: lb.algorithm,
            default_rtt: Duration::from_millis(lb.default_rtt_ms),
            decay: Duration::from_millis(lb.decay_ms),
            slow_start: Duration::from_millis(lb.slow_start_ms),
            consecutive_failures: od.consecutive_failures,
            base_ejection: Duration::from_millis(od.base_ejection_ms),
            max_ejection: Duration::from_millis(od.max_ejection_ms),
            max_ejected_percent: od.max_ejected_percent,
        }
    }
}

/// One endpoint's series (`weir_endpoint_*{dependency, endpoint}`), updated as requests pass:
/// plain atomics on the request path, no label lookup.
#[derive(Clone, Debug, Default)]
pub struct EndpointMetrics {
    pub requests: Counter,
    pub ejections: Counter,
    pub in_flight: Gauge,
    /// The peak-EWMA latency estimate at the last answer, in seconds.
    pub rtt: Gauge<f64, AtomicU64>,
    /// 1 while ejected or on probation (0 once a probe brought it back).
    pub ejected: Gauge,
    /// The dependency's count of ejected endpoints (shared by its endpoints).
    pub dependency_ejected: Gauge,
}

/// Makes an endpoint's series when it joins the set, and drops them when it leaves.
pub trait EndpointObserver: Send + Sync + std::fmt::Debug {
    fn joined(&self, addr: SocketAddr) -> EndpointMetrics;
    fn left(&self, addr: SocketAddr);
}

/// How a request to an endpoint ended, as far as the endpoint's health goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// An answer that says nothing against the endpoint (2xx–4xx, any gRPC status but
    /// UNAVAILABLE).
    Success,
    /// A gateway failure: connection reset, 502/503/504, gRPC UNAVAILABLE.
    GatewayFailure,
    /// No connection could be made (refused, unreachable, timed out): the endpoint is most
    /// likely gone (a pod deleted before discovery said so), so it is ejected at once, within
    /// the cap, rather than after [`Settings::consecutive_failures`].
    ConnectFailure,
    /// The caller went away before the answer: no verdict.
    Cancelled,
}

/// An endpoint's health as the balancer sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Health {
    Active,
    /// Ejected until then.
    Ejected(Instant),
    /// Its ejection is over; one request is probing it (or may).
    Probation,
}

/// The least weight one answer has in its endpoint's estimate.
const MIN_SAMPLE_WEIGHT: f64 = 0.1;

#[derive(Debug)]
struct State {
    /// It has answered once (that answer is not measured).
    answered: bool,
    /// Answers measured since (saturating): none means `rtt` is the prior.
    measurements: u32,
    /// Peak-EWMA RTT estimate, in seconds, as of `updated`.
    rtt: f64,
    updated: Instant,
    failures: u32,
    ejections: u32,
    health: Health,
}

/// One endpoint of a dependency.
#[derive(Debug)]
pub struct Endpoint {
    pub addr: SocketAddr,
    added: Instant,
    metrics: EndpointMetrics,
    in_flight: AtomicU32,
    /// The probe of an endpoint on probation is out.
    probing: AtomicBool,
    state: Mutex<State>,
}

impl Endpoint {
    fn new(addr: SocketAddr, now: Instant, rtt: f64, metrics: EndpointMetrics) -> Self {
        metrics.rtt.set(rtt);
        Endpoint {
            addr,
            added: now,
            metrics,
            in_flight: AtomicU32::new(0),
            probing: AtomicBool::new(false),
            state: Mutex::new(State {
                answered: false,
                measurements: 0,
                rtt,
                updated: now,
                failures: 0,
                ejections: 0,
                health: Health::Active,
            }),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Requests in flight to this endpoint.
    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// The RTT estimate now (decayed since the last answer).
    pub fn rtt(&self, now: Instant, s: &Settings) -> Duration {
        Duration::from_secs_f64(self.state().estimate(now, s))
    }

    /// Its health now: an ejection that is over reads as probation.
    pub fn health(&self, now: Instant) -> Health {
        match self.state().health {
            Health::Ejected(until) if until <= now => Health::Probation,
            h => h,
        }
    }

    /// Its state now, read under one lock.
    fn snap(&self, now: Instant, s: &Settings) -> Snap {
        let st = self.state();
        Snap {
            health: match st.health {
                Health::Ejected(until) if until <= now => Health::Probation,
                h => h,
            },
            measured: st.measurements > 0,
            rtt: st.estimate(now, s),
        }
    }

    /// `prior`: the RTT assumed while it has never answered (its measured peers' mean).
    fn cost(&self, snap: &Snap, prior: f64) -> f64 {
        let rtt = if snap.measured { snap.rtt } else { prior };
        rtt * f64::from(self.in_flight() + 1)
    }

    /// How far into its slow start it is: 0.1 when it appears, 1 once `slow_start` has passed.
    fn warmth(&self, now: Instant, s: &Settings) -> f64 {
        if s.slow_start.is_zero() {
            1.0
        } else {
            (now.saturating_duration_since(self.added).as_secs_f64() / s.slow_start.as_secs_f64())
                .clamp(0.1, 1.0)
        }
    }
}

/// What an endpoint that never answered is assumed to take: its measured peers' mean (so it
/// is neither shunned behind a pessimistic default nor flooded), or the default RTT.
fn prior_rtt(snaps: &[Snap], s: &Settings) -> f64 {
    let (sum, n) = snaps
        .iter()
        .filter(|e| e.measured)
        .fold((0.0, 0u32), |(sum, n), e| (sum + e.rtt, n + 1));
    if n == 0 {
        s.default_rtt.as_secs_f64()
    } else {
        sum / f64::from(n)
    }
}

/// An endpoint's state as one choice reads it.
#[derive(Clone, Copy, Debug)]
struct Snap {
    health: Health,
    measured: bool,
    /// The decayed estimate, in seconds.
    rtt: f64,
}

/// Answers after which an estimate decays at the full [`Settings::decay`].
const SETTLED_MEASUREMENTS: u32 = 10;

impl State {
    /// The estimate as of `now`: it decays towards zero while nothing is learnt, so an endpoint
    /// that was slow gets a request again after a while and is measured anew (tower's and
    /// Linkerd's peak EWMA do the same).
    ///
    /// An estimate of `n` answers decays with `decay × (n/10)²` until ten: it says little yet
    /// (a new pod's early answers carry cold caches and pools), and an endpoint is only
    /// measured anew once its estimate has decayed below its peers'. With the full decay from
    /// the start, one answer 50× slower than the peers' keeps a pod out for `ln 50 × 10 s`
    /// ≈ 40 s; so, for 0.4 s.
    fn estimate(&self, now: Instant, s: &Settings) -> f64 {
        let settled = f64::from(self.measurements.clamp(1, SETTLED_MEASUREMENTS))
            / f64::from(SETTLED_MEASUREMENTS);
        let decay = s.decay.as_secs_f64() * settled * settled;
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        self.rtt * (-elapsed / decay.max(1e-9)).exp()
    }
}

/// A request's hold on an endpoint: counts it in flight until [`Picked::finish`] (or drop, which
/// counts as [`Outcome::Cancelled`]).
#[derive(Debug)]
pub struct Picked {
    pub endpoint: Arc<Endpoint>,
    balancer: Arc<Shared>,
    start: Instant,
    probe: bool,
    done: bool,
}

impl Picked {
    /// The request waited for a new connection, ready at `at`: its answer is timed from then,
    /// not from the choice (see [`crate::connected_at`]).
    pub fn waited_for_connection(&mut self, at: Instant) {
        self.start = self.start.max(at);
    }

    /// Records how the request ended.
    pub fn finish(mut self, outcome: Outcome) {
        self.record(outcome);
    }

    fn record(&mut self, outcome: Outcome) {
        if std::mem::replace(&mut self.done, true) {
            return;
        }
        let ep = &self.endpoint;
        ep.in_flight.fetch_sub(1, Ordering::Relaxed);
        ep.metrics.in_flight.dec();
        let now = Instant::now();
        let s = &self.balancer.settings;
        let want_ejection = {
            let mut st = ep.state();
            let rtt = now.saturating_duration_since(self.start).as_secs_f64();
            let current = st.estimate(now, s);
            // A request given up on (its deadline passed, its caller left) still says the
            // endpoint was at least that slow: a black hole must not look fast.
            if !st.answered {
                // An endpoint's first answer carries its connection's setup and a cold app, not
                // its latency: taken as a peak it would keep a new pod out of the choice for half
                // a minute. The next answer measures it (a pod that is really slow is avoided
                // from its second answer on).
                st.answered = true;
            } else if outcome != Outcome::Cancelled || rtt > current {
                st.rtt = if st.measurements == 0 {
                    // The first measurement replaces the prior.
                    rtt
                } else if rtt > current {
                    // A slower answer is taken at once (the peak).
                    rtt
                } else {
                    // From the last estimate towards the new answer, as far as the time since
                    // the last answer says (the same weight that decays it between answers),
                    // and at least by `MIN_SAMPLE_WEIGHT`: at thousands of answers a second the
                    // time alone would freeze the estimates, and with them the choice.
                    let w = (current / st.rtt.max(f64::MIN_POSITIVE)).min(1.0 - MIN_SAMPLE_WEIGHT);
                    st.rtt * w + rtt * (1.0 - w)
                };
                st.measurements = st.measurements.saturating_add(1);
                st.updated = now;
                ep.metrics.rtt.set(st.rtt);
            }
            match outcome {
                Outcome::Success => {
                    st.failures = 0;
                    if self.probe {
                        st.health = Health::Active;
                        st.ejections = 0;
                        ep.metrics.ejected.dec();
                        ep.metrics.dependency_ejected.dec();
                    }
                    false
                }
                Outcome::GatewayFailure => {
                    st.failures += 1;
                    self.probe
                        || (st.health == Health::Active && st.failures >= s.consecutive_failures)
                }
                Outcome::ConnectFailure => {
                    st.failures += 1;
                    self.probe || st.health == Health::Active
                }
                Outcome::Cancelled => false,
            }
        };
        // The cap looks at the other endpoints' states: not while holding this one's lock.
        if want_ejection && (self.probe || self.balancer.may_eject(&ep.addr, now)) {
            let mut st = ep.state();
            if st.health == Health::Active {
                ep.metrics.ejected.inc();
                ep.metrics.dependency_ejected.inc();
            }
            st.ejections += 1;
            let factor = 2u32.saturating_pow(st.ejections - 1);
            let length = s.base_ejection.saturating_mul(factor).min(s.max_ejection);
            st.health = Health::Ejected(now + length);
            st.failures = 0;
            ep.metrics.ejections.inc();
            tracing::warn!(
                endpoint = %ep.addr,
                ejection_s = length.as_secs_f64(),
                ejections = st.ejections,
                "endpoint ejected after gateway failures"
            );
        }
        if self.probe {
            ep.probing.store(false, Ordering::Release);
        }
    }
}

impl Drop for Picked {
    fn drop(&mut self) {
        self.record(Outcome::Cancelled);
    }
}

#[derive(Debug)]
struct Shared {
    settings: Settings,
    endpoints: RwLock<Vec<Arc<Endpoint>>>,
    observer: Option<Arc<dyn EndpointObserver>>,
    /// Round robin's position.
    next: AtomicUsize,
}

impl Shared {
    fn read(&self) -> std::sync::RwLockReadGuard<'_, Vec<Arc<Endpoint>>> {
        self.endpoints.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether one more endpoint (other than `addr`, which is not ejected yet) may be ejected
    /// without passing the cap; at least one endpoint always stays.
    fn may_eject(&self, addr: &SocketAddr, now: Instant) -> bool {
        let list = self.read();
        let ejected = list
            .iter()
            .filter(|e| e.addr != *addr && matches!(e.health(now), Health::Ejected(_)))
            .count();
        let cap = list.len() * self.settings.max_ejected_percent as usize / 100;
        ejected < cap.min(list.len().saturating_sub(1))
    }
}

impl Drop for Shared {
    /// A balancer replaced by a reload takes its endpoints' series with it.
    fn drop(&mut self) {
        let now = Instant::now();
        let list = self.endpoints.get_mut().unwrap_or_else(|e| e.into_inner());
        for e in list.iter() {
            if e.health(now) != Health::Active {
                e.metrics.dependency_ejected.dec();
            }
            if let Some(o) = &self.observer {
                o.left(e.addr);
            }
        }
    }
}

/// The endpoints of one dependency and the choice among them.
#[derive(Clone, Debug)]
pub struct Balancer {
    shared: Arc<Shared>,
}

impl Balancer {
    pub fn new(settings: Settings) -> Self {
        Balancer::observed(settings, None)
    }

    /// A balancer whose endpoints' series are made and dropped by `observer`.
    pub fn observed(settings: Settings, observer: Option<Arc<dyn EndpointObserver>>) -> Self {
        Balancer {
            shared: Arc::new(Shared {
                settings,
                endpoints: RwLock::new(Vec::new()),
                observer,
                next: AtomicUsize::new(0),
            }),
        }
    }

    pub fn settings(&self) -> &Settings {
        &self.shared.settings
    }

    /// Replaces the endpoint set; endpoints already known keep their state. A new endpoint's
    /// RTT estimate starts at the mean of its peers' (so it is neither shunned behind a
    /// pessimistic default nor flooded; slow start does the rest), or at the default RTT.
    pub fn update(&self, addrs: &[SocketAddr]) {
        let now = Instant::now();
        let s = &self.shared.settings;
        let mut list = self
            .shared
            .endpoints
            .write()
            .unwrap_or_else(|e| e.into_inner());
        let start = if list.is_empty() {
            s.default_rtt.as_secs_f64()
        } else {
            list.iter()
                .map(|e| e.rtt(now, s).as_secs_f64())
                .sum::<f64>()
                / list.len() as f64
        };
        let mut next: Vec<Arc<Endpoint>> = Vec::with_capacity(addrs.len());
        for a in addrs {
            if next.iter().any(|e| e.addr == *a) {
                continue;
            }
            let e = list
                .iter()
                .find(|e| e.addr == *a)
                .cloned()
                .unwrap_or_else(|| {
                    let m = self
                        .shared
                        .observer
                        .as_ref()
                        .map(|o| o.joined(*a))
                        .unwrap_or_default();
                    Arc::new(Endpoint::new(*a, now, start, m))
                });
            next.push(e);
        }
        for gone in list
            .iter()
            .filter(|e| !next.iter().any(|n| n.addr == e.addr))
        {
            if gone.health(now) != Health::Active {
                gone.metrics.dependency_ejected.dec();
            }
            if let Some(o) = &self.shared.observer {
                o.left(gone.addr);
            }
        }
        *list = next;
    }

    /// Whether any endpoint but `addr` may take requests now (not ejected).
    pub fn others_active(&self, addr: SocketAddr) -> bool {
        let now = Instant::now();
        self.shared
            .read()
            .iter()
            .any(|e| e.addr != addr && !matches!(e.health(now), Health::Ejected(_)))
    }

    /// The endpoints and their state now, for the admin listener.
    pub fn view(&self) -> Vec<EndpointView> {
        let now = Instant::now();
        let s = &self.shared.settings;
        self.shared
            .read()
            .iter()
            .map(|e| {
                let st = e.state();
                let (health, ejected_for_ms) = match st.health {
                    Health::Ejected(until) if until > now => {
                        ("ejected", Some((until - now).as_millis() as u64))
                    }
                    Health::Ejected(_) | Health::Probation => ("probation", None),
                    Health::Active => ("active", None),
                };
                EndpointView {
                    address: e.addr,
                    health,
                    ejected_for_ms,
                    latency_ewma_ms: st.estimate(now, s) * 1000.0,
                    in_flight: e.in_flight(),
                    consecutive_failures: st.failures,
                    ejections: st.ejections,
                }
            })
            .collect()
    }

    /// The current endpoints.
    pub fn endpoints(&self) -> Vec<Arc<Endpoint>> {
        self.shared.read().clone()
    }

    /// How many endpoints there are.
    pub fn len(&self) -> usize {
        self.shared.read().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Picks an endpoint for one request: an endpoint on probation whose probe is not out takes
    /// it; else two active endpoints drawn at random, the cheaper wins; `avoid` only when no
    /// other is eligible. `None` when there is no endpoint at all. When every endpoint is
    /// ejected, the one whose ejection ends first is used rather than failing the request.
    pub fn pick(&self, avoid: Option<SocketAddr>) -> Option<Picked> {
        self.pick_from(avoid, 1)
    }

    /// [`Balancer::pick`] when there are `at_least` endpoints (one look at the set), else
    /// `None`.
    pub fn pick_from(&self, avoid: Option<SocketAddr>, at_least: usize) -> Option<Picked> {
        let now = Instant::now();
        let s = &self.shared.settings;
        // Each endpoint's state read once, under one lock each; no other allocation on the way.
        let list = self.shared.read();
        if list.is_empty() || list.len() < at_least {
            return None;
        }
        let snaps: Vec<Snap> = list.iter().map(|e| e.snap(now, s)).collect();
        for (e, snap) in list.iter().zip(&snaps) {
            if Some(e.addr) != avoid
                && snap.health == Health::Probation
                && e.probing
                    .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
            {
                return Some(self.hold(e.clone(), now, true));
            }
        }
        // Active endpoints but the one to avoid; all active ones when that leaves none.
        let eligible = |i: usize, strict: bool| {
            snaps[i].health == Health::Active && !(strict && Some(list[i].addr) == avoid)
        };
        let mut strict = true;
        let mut n = (0..list.len()).filter(|&i| eligible(i, true)).count();
        if n == 0 {
            strict = false;
            n = (0..list.len()).filter(|&i| eligible(i, false)).count();
        }
        let nth = |k: usize| {
            (0..list.len())
                .filter(|&i| eligible(i, strict))
                .nth(k)
                .expect("k < n")
        };
        let chosen = match n {
            0 => (0..list.len())
                .min_by_key(|&i| match snaps[i].health {
                    Health::Ejected(until) => until,
                    _ => now,
                })
                .expect("not empty"),
            1 => nth(0),
            n if s.algorithm == BalanceAlgorithm::RoundRobin => {
                nth(self.shared.next.fetch_add(1, Ordering::Relaxed) % n)
            }
            n => {
                let i = (crate::trace::random_u64() % n as u64) as usize;
                let mut j = (crate::trace::random_u64() % (n as u64 - 1)) as usize;
                if j >= i {
                    j += 1;
                }
                let (a, b) = (nth(i), nth(j));
                let prior = if snaps[a].measured && snaps[b].measured {
                    0.0
                } else {
                    prior_rtt(&snaps, s)
                };
                let cost = |k: usize| list[k].cost(&snaps[k], prior);
                let (win, lose) = if cost(a) <= cost(b) { (a, b) } else { (b, a) };
                // Slow start: a winner colder than the other takes the request with the chance of
                // its warmth over the other's (endpoints that appeared together compete on
                // latency alone).
                let (warm_win, warm_lose) = (list[win].warmth(now, s), list[lose].warmth(now, s));
                if warm_win < warm_lose && unit_random() >= warm_win / warm_lose {
                    lose
                } else {
                    win
                }
            }
        };
        Some(self.hold(list[chosen].clone(), now, false))
    }

    fn hold(&self, endpoint: Arc<Endpoint>, now: Instant, probe: bool) -> Picked {
        endpoint.in_flight.fetch_add(1, Ordering::Relaxed);
        endpoint.metrics.in_flight.inc();
        endpoint.metrics.requests.inc();
        Picked {
            endpoint,
            balancer: self.shared.clone(),
            start: now,
            probe,
            done: false,
        }
    }
}

/// A uniform draw in `[0, 1)`.
fn unit_random() -> f64 {
    (crate::trace::random_u64() >> 11) as f64 / (1u64 << 53) as f64
}

/// A request extension: the endpoint a retry should avoid (the one that just failed it).
#[derive(Clone, Copy, Debug)]
pub struct Avoid(pub SocketAddr);

/// A response extension on a failed answer (a gateway failure, any 5xx; the retry layer takes
/// the endpoint to avoid from it): the endpoint that answered, and whether its failure is spared the
/// dependency's circuit breaker (the endpoint is ejected and others still take requests: the
/// breaker judges the dependency as a whole, ejection judges endpoints).
#[derive(Clone, Copy, Debug)]
pub struct ServedBy {
    pub addr: SocketAddr,
    pub spared: bool,
}

/// One endpoint as `GET /endpoints` on the admin listener shows it.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EndpointView {
    pub address: SocketAddr,
    /// `active`, `ejected` or `probation` (its ejection is over; the next request probes it).
    pub health: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ejected_for_ms: Option<u64>,
    pub latency_ewma_ms: f64,
    pub in_flight: u32,
    pub consecutive_failures: u32,
    /// Ejections in a row (the next one lasts `2^ejections` × the base time, capped).
    pub ejections: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(i: u8) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, i], 8080))
    }

    fn settings() -> Settings {
        Settings {
            slow_start: Duration::ZERO,
            ..Settings::default()
        }
    }

    /// Sends `n` sequential requests, each taking `rtt(addr)` or failing when `fails(addr)`;
    /// returns how many each endpoint got.
    async fn run(
        b: &Balancer,
        n: usize,
        rtt: impl Fn(SocketAddr) -> Duration,
        fails: impl Fn(SocketAddr) -> bool,
    ) -> std::collections::HashMap<SocketAddr, usize> {
        let mut got = std::collections::HashMap::new();
        for _ in 0..n {
            let p = b.pick(None).unwrap();
            let a = p.endpoint.addr;
            *got.entry(a).or_default() += 1;
            tokio::time::sleep(rtt(a)).await;
            p.finish(if fails(a) {
                Outcome::GatewayFailure
            } else {
                Outcome::Success
            });
        }
        got
    }

    #[tokio::test(start_paused = true)]
    async fn traffic_spreads_and_a_slow_endpoint_gets_a_small_share() {
        let b = Balancer::new(settings());
        b.update(&[addr(2), addr(3), addr(4)]);
        let even = run(&b, 3000, |_| Duration::from_millis(5), |_| false).await;
        for a in [addr(2), addr(3), addr(4)] {
            assert!(even[&a] > 700, "{even:?}");
        }
        // One endpoint 10× slower: picked again only once its estimate has decayed below the
        // others' (then measured slow anew), so its share falls far below a third.
        let skewed = run(
            &b,
            3000,
            |a| Duration::from_millis(if a == addr(4) { 50 } else { 5 }),
            |_| false,
        )
        .await;
        let share = skewed.get(&addr(4)).copied().unwrap_or(0) as f64 / 3000.0;
        assert!(share < 0.05, "slow endpoint share {share}: {skewed:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn in_flight_requests_steer_away_from_a_busy_endpoint() {
        let b = Balancer::new(settings());
        b.update(&[addr(2), addr(3)]);
        let held: Vec<_> = (0..5).map(|_| b.pick(None).unwrap()).collect();
        // Equal RTTs: the in-flight counts alternate the picks.
        let on2 = held.iter().filter(|p| p.endpoint.addr == addr(2)).count();
        assert!((2..=3).contains(&on2), "{on2} of 5 on one endpoint");
    }

    #[tokio::test(start_paused = true)]
    async fn a_failing_endpoint_is_ejected_probed_once_and_returns() {
        let s = settings();
        let b = Balancer::new(s.clone());
        b.update(&[addr(2), addr(3), addr(4)]);
        let failing = std::sync::atomic::AtomicBool::new(true);
        let got = run(
            &b,
            300,
            |_| Duration::from_millis(1),
            |a| a == addr(4) && failing.load(Ordering::Relaxed),
        )
        .await;
        // Exactly the configured failures reached it before the ejection.
        assert_eq!(got[&addr(4)], 5, "{got:?}");
        let ep4 = b
            .endpoints()
            .into_iter()
            .find(|e| e.addr == addr(4))
            .unwrap();
        assert!(matches!(ep4.health(Instant::now()), Health::Ejected(_)));
        // While ejected: nothing.
        let got = run(&b, 300, |_| Duration::from_millis(1), |_| false).await;
        assert_eq!(got.get(&addr(4)), None);
        // After the base ejection time: one probe, which fails: ejected for twice as long.
        tokio::time::advance(s.base_ejection).await;
        let got = run(&b, 50, |_| Duration::from_millis(1), |a| a == addr(4)).await;
        assert_eq!(got[&addr(4)], 1, "exactly one probe: {got:?}");
        let Health::Ejected(until) = ep4.health(Instant::now()) else {
            panic!("a failed probe ejects again")
        };
        let left = until - Instant::now();
        assert!(
            left > s.base_ejection && left <= s.base_ejection * 2,
            "{left:?}"
        );
        // Then a probe that succeeds brings it back for good.
        tokio::time::advance(s.base_ejection * 2).await;
        failing.store(false, Ordering::Relaxed);
        let got = run(&b, 300, |_| Duration::from_millis(1), |_| false).await;
        assert!(got[&addr(4)] > 50, "back in rotation: {got:?}");
        assert_eq!(ep4.health(Instant::now()), Health::Active);
    }

    #[tokio::test(start_paused = true)]
    async fn at_most_half_the_endpoints_are_ejected_and_one_always_stays() {
        let b = Balancer::new(settings());
        b.update(&[addr(2), addr(3), addr(4), addr(5)]);
        run(&b, 400, |_| Duration::from_millis(1), |_| true).await;
        let now = Instant::now();
        let ejected = b
            .endpoints()
            .iter()
            .filter(|e| matches!(e.health(now), Health::Ejected(_)))
            .count();
        assert_eq!(ejected, 2, "the 50 % cap");
        let lone = Balancer::new(settings());
        lone.update(&[addr(2)]);
        run(&lone, 50, |_| Duration::from_millis(1), |_| true).await;
        assert_eq!(lone.endpoints()[0].health(Instant::now()), Health::Active);
    }

    #[tokio::test(start_paused = true)]
    async fn retries_avoid_the_endpoint_that_just_failed_and_removed_ones_get_nothing() {
        let b = Balancer::new(settings());
        b.update(&[addr(2), addr(3)]);
        for _ in 0..100 {
            let p = b.pick(Some(addr(2))).unwrap();
            assert_eq!(p.endpoint.addr, addr(3));
        }
        // Only one left: it is used even when it is the one to avoid.
        b.update(&[addr(2)]);
        assert_eq!(b.pick(Some(addr(2))).unwrap().endpoint.addr, addr(2));
        // An endpoint that leaves the set gets no new requests; one that stays keeps its state.
        b.update(&[addr(2), addr(3)]);
        let before = b.endpoints()[0].clone();
        b.update(&[addr(3), addr(2)]);
        assert!(Arc::ptr_eq(&before, &b.endpoints()[1]));
        b.update(&[addr(3)]);
        let got = run(&b, 50, |_| Duration::from_millis(1), |_| false).await;
        assert_eq!(got.keys().copied().collect::<Vec<_>>(), [addr(3)]);
        assert!(Balancer::new(settings()).pick(None).is_none());
    }

    /// An answer that waited for its connection is timed from when the connection was ready.
    #[tokio::test(start_paused = true)]
    async fn the_wait_for_a_connection_is_not_latency() {
        let b = Balancer::new(settings());
        b.update(&[addr(2)]);
        run(&b, 20, |_| Duration::from_millis(2), |_| false).await;
        let mut p = b.pick(None).unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        p.waited_for_connection(Instant::now());
        tokio::time::sleep(Duration::from_millis(2)).await;
        p.finish(Outcome::Success);
        let rtt = b.endpoints()[0].rtt(Instant::now(), b.settings());
        assert!(rtt < Duration::from_millis(3), "{rtt:?}");
        // The same answer without the wait taken out is the peak.
        let p = b.pick(None).unwrap();
        tokio::time::sleep(Duration::from_millis(302)).await;
        p.finish(Outcome::Success);
        let rtt = b.endpoints()[0].rtt(Instant::now(), b.settings());
        assert!(rtt >= Duration::from_millis(300), "{rtt:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_first_answer_does_not_keep_a_new_endpoint_out() {
        let b = Balancer::new(settings());
        b.update(&[addr(2), addr(3)]);
        run(&b, 100, |_| Duration::from_millis(1), |_| false).await;
        b.update(&[addr(2), addr(3), addr(4)]);
        // Its first answer takes 50× its peers' (a new connection, a cold app); then as fast.
        let mut first = true;
        let mut got = 0;
        for _ in 0..300 {
            let p = b.pick(None).unwrap();
            let slow = p.endpoint.addr == addr(4) && std::mem::take(&mut first);
            if p.endpoint.addr == addr(4) {
                got += 1;
            }
            tokio::time::sleep(Duration::from_millis(if slow { 50 } else { 1 })).await;
            p.finish(Outcome::Success);
        }
        assert!(got > 50, "the new endpoint got {got} of 300");
    }

    /// Calls every 10 ms for `secs` seconds, each answered in 1 ms but by `slow` for its
    /// `slow_answers` answers after the first; returns how many calls each endpoint got.
    async fn paced(
        b: &Balancer,
        secs: u64,
        slow: SocketAddr,
        slow_answers: std::ops::Range<usize>,
    ) -> std::collections::HashMap<SocketAddr, usize> {
        let mut got = std::collections::HashMap::<SocketAddr, usize>::new();
        for _ in 0..secs * 100 {
            let p = b.pick(None).unwrap();
            let n = got.entry(p.endpoint.addr).or_default();
            let this_slow = p.endpoint.addr == slow && slow_answers.contains(n);
            *n += 1;
            tokio::time::sleep(Duration::from_millis(if this_slow { 50 } else { 1 })).await;
            p.finish(Outcome::Success);
            tokio::time::sleep(Duration::from_millis(9)).await;
        }
        got
    }

    #[tokio::test(start_paused = true)]
    async fn a_new_endpoint_slow_for_its_first_measured_answers_is_back_within_seconds() {
        // Its first answers after the unmeasured one take 50× its peers' (a cold app): with
        // the full 10 s decay from the start it would be out for ln 50 × 10 s ≈ 40 s. An
        // estimate of few answers decays faster, so it is measured anew within seconds.
        for slow_answers in [1..2, 1..4] {
            let b = Balancer::new(settings());
            b.update(&[addr(2), addr(3)]);
            paced(&b, 1, addr(9), 0..0).await;
            b.update(&[addr(2), addr(3), addr(4)]);
            let got = paced(&b, 20, addr(4), slow_answers.clone()).await;
            let share = got.get(&addr(4)).copied().unwrap_or(0) as f64 / 2000.0;
            eprintln!("slow answers {slow_answers:?}: {share}");
            assert!(
                share > 0.2,
                "slow answers {slow_answers:?}: the new endpoint got {share} of the calls: {got:?}"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_endpoint_measured_long_keeps_the_full_decay() {
        // A peak after many answers still keeps it out for about decay × ln(ratio).
        let b = Balancer::new(settings());
        b.update(&[addr(2), addr(3), addr(4)]);
        paced(&b, 10, addr(9), 0..0).await;
        let ep4 = b
            .endpoints()
            .into_iter()
            .find(|e| e.addr == addr(4))
            .unwrap();
        // Requests held in flight on the others until one goes to it.
        let mut held = Vec::new();
        let p = loop {
            let p = b.pick(None).unwrap();
            if p.endpoint.addr == addr(4) {
                break p;
            }
            held.push(p);
        };
        drop(held);
        tokio::time::sleep(Duration::from_millis(50)).await;
        p.finish(Outcome::Success);
        assert!(ep4.rtt(Instant::now(), &settings()) >= Duration::from_millis(49));
        let got = paced(&b, 10, addr(9), 0..0).await;
        let share = got.get(&addr(4)).copied().unwrap_or(0) as f64 / 1000.0;
        assert!(share < 0.05, "{share}: {got:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn slow_start_ramps_a_new_endpoint_up_rather_than_keeping_it_out() {
        // Equal latencies, one call at a time: a cost divided by the warmth would lose every
        // draw until the pod is warm; drawn with a chance that grows with it, it gets calls
        // from the start, fewer than its peers.
        let s = Settings {
            slow_start: Duration::from_secs(10),
            ..Settings::default()
        };
        let b = Balancer::new(s.clone());
        b.update(&[addr(2), addr(3)]);
        tokio::time::advance(Duration::from_secs(60)).await;
        paced(&b, 1, addr(9), 0..0).await;
        b.update(&[addr(2), addr(3), addr(4)]);
        let first = paced(&b, 3, addr(9), 0..0).await;
        let early = first.get(&addr(4)).copied().unwrap_or(0);
        assert!(
            (10..100).contains(&early),
            "the new endpoint got {early} of the first 300 calls: {first:?}"
        );
        // Endpoints that appear together (a proxy's start, a first resolution) warm up together:
        // their slow start does not send the slower one calls its latency would not earn.
        let b = Balancer::new(s);
        b.update(&[addr(2), addr(3), addr(4)]);
        let got = paced(&b, 5, addr(4), 1..usize::MAX).await;
        let slow = got.get(&addr(4)).copied().unwrap_or(0);
        assert!(slow < 25, "the slow endpoint got {slow} of 500: {got:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_new_endpoint_warms_up_over_the_slow_start() {
        let s = Settings {
            slow_start: Duration::from_secs(10),
            ..Settings::default()
        };
        let b = Balancer::new(s);
        b.update(&[addr(2), addr(3)]);
        tokio::time::advance(Duration::from_secs(60)).await;
        b.update(&[addr(2), addr(3), addr(4)]);
        let early = run(&b, 300, |_| Duration::from_millis(5), |_| false).await;
        let early_share = early.get(&addr(4)).copied().unwrap_or(0);
        tokio::time::advance(Duration::from_secs(10)).await;
        let late = run(&b, 300, |_| Duration::from_millis(5), |_| false).await;
        let late_share = late.get(&addr(4)).copied().unwrap_or(0);
        assert!(
            early_share * 2 < late_share,
            "early {early_share} vs warmed {late_share} of 300"
        );
    }
}
