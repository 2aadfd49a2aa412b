//! A deterministic synthetic market of 1-minute bars, for scale tests and the
//! demo. The same (ticker, minute) always gets the same bar, whatever range is
//! asked for: each ticker has a daily price level that follows a geometric
//! random walk from 2000-01-03, and each session is a random walk seeded by
//! (ticker, date) that starts from that level (so overnight gaps appear).

use chrono::{Duration, NaiveDate};

use crate::calendar;
use crate::types::Bar;

/// splitmix64: small, fast, and identical on every platform.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed)
    }
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in (0, 1).
    fn uniform(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }
    /// Standard normal (Box–Muller).
    fn normal(&mut self) -> f64 {
        let (u1, u2) = (self.uniform(), self.uniform());
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }
}

fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Per-ticker parameters, derived from the ticker's name.
#[derive(Debug, Clone, Copy)]
struct Params {
    start_price: f64,
    daily_drift: f64,
    daily_vol: f64,
    base_volume: f64,
}

impl Params {
    fn of(ticker: &str) -> Self {
        let mut r = Rng::new(fnv1a(ticker));
        Params {
            start_price: 20.0 + 480.0 * r.uniform(),
            daily_drift: (-0.05 + 0.20 * r.uniform()) / 252.0,
            daily_vol: 0.01 + 0.02 * r.uniform(),
            base_volume: 2_000.0 + 50_000.0 * r.uniform(),
        }
    }
}

const EPOCH: (i32, u32, u32) = (2000, 1, 3);

/// The synthetic market generator.
#[derive(Debug, Clone, Copy, Default)]
pub struct SyntheticMarket;

impl SyntheticMarket {
    /// The 1-minute bars of `ticker` on the trading days in `[from, to]`.
    pub fn bars(&self, ticker: &str, from: NaiveDate, to: NaiveDate) -> Vec<Bar> {
        let p = Params::of(ticker);
        let epoch = NaiveDate::from_ymd_opt(EPOCH.0, EPOCH.1, EPOCH.2).expect("valid epoch");
        let seed = fnv1a(ticker);
        let mut level = p.start_price;
        let mut out = Vec::new();
        let mut day = epoch;
        while day <= to {
            if calendar::is_trading_day(day) {
                if day >= from {
                    self.session_bars(seed, day, level, &p, &mut out);
                }
                let mut r = Rng::new(seed ^ (day.to_epoch_days() as u64).wrapping_mul(31));
                level *= (p.daily_drift - 0.5 * p.daily_vol * p.daily_vol
                    + p.daily_vol * r.normal())
                .exp();
            }
            day += Duration::days(1);
        }
        out
    }

    fn session_bars(&self, seed: u64, day: NaiveDate, level: f64, p: &Params, out: &mut Vec<Bar>) {
        let Some((open, close)) = calendar::session(day) else {
            return;
        };
        let minutes = (close - open).num_minutes();
        let mut r = Rng::new(seed.rotate_left(17) ^ (day.to_epoch_days() as u64));
        let sigma = p.daily_vol / (390f64).sqrt();
        let mut price = level * (0.002 * r.normal()).exp();
        for m in 0..minutes {
            let o = price;
            let c = o * (sigma * r.normal()).exp();
            let h = o.max(c) * (0.5 * sigma * r.normal().abs()).exp();
            let l = o.min(c) * (-0.5 * sigma * r.normal().abs()).exp();
            // U-shaped intraday volume: heavy at the open and the close.
            let x = m as f64 / minutes as f64;
            let shape = 1.0 + 3.0 * (2.0 * x - 1.0).powi(4);
            let v = (p.base_volume * shape * (0.3 * r.normal()).exp()).round() as u64 + 1;
            out.push(Bar {
                t: open + Duration::minutes(m),
                o: round4(o),
                h: round4(h),
                l: round4(l),
                c: round4(c),
                v,
                n: v / 50 + 1,
                vw: round4((o + h + l + c) / 4.0),
            });
            price = c;
        }
    }
}

fn round4(x: f64) -> f64 {
    (x * 10_000.0).round() / 10_000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_and_range_independent() {
        let m = SyntheticMarket;
        let d = |s: &str| s.parse::<NaiveDate>().unwrap();
        let week = m.bars("AAPL", d("2024-01-08"), d("2024-01-12"));
        assert_eq!(week.len(), 5 * 390);
        let day = m.bars("AAPL", d("2024-01-10"), d("2024-01-10"));
        assert_eq!(&week[2 * 390..3 * 390], &day[..]);
        assert_ne!(m.bars("MSFT", d("2024-01-10"), d("2024-01-10")), day);
        for b in &week {
            assert!(b.h >= b.l && b.h >= b.o.min(b.c) && b.l <= b.o.max(b.c) && b.o > 0.0);
        }
        // An early close has 210 minutes.
        assert_eq!(m.bars("AAPL", d("2024-11-29"), d("2024-11-29")).len(), 210);
    }
}
