//! A direct reader for bar messages in the form our producers and Alpaca
//! write: `{"ticker":"…","bars":[{"t":"…","o":…,…},…]}`. It reads only
//! what it is sure of and returns `None` for anything else (an unknown or
//! repeated key, an escape, a negative or out-of-range number, bad JSON),
//! so that serde reads that payload and reports the error with its path.
//! Where it returns a message, serde would have returned the same one: a
//! test compares the two on valid and mutated payloads.
//!
//! serde's derived reader spent a quarter of the ingest node's time on the
//! 12M-bar benchmark; this one reads the same bytes several times faster.

use crate::types::{utc_time, Bar, BarsMessage};

/// A number token as [`Reader::number`] read it.
struct Number<'a> {
    token: &'a [u8],
    m: Option<u64>,
    frac: usize,
    exponent: bool,
}

struct Reader<'a> {
    b: &'a [u8],
    i: usize,
}

impl<'a> Reader<'a> {
    fn ws(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.b.get(self.i) {
            self.i += 1;
        }
    }

    /// The next non-space byte, consumed.
    fn next(&mut self) -> Option<u8> {
        self.ws();
        let c = *self.b.get(self.i)?;
        self.i += 1;
        Some(c)
    }

    fn eat(&mut self, c: u8) -> Option<()> {
        (self.next()? == c).then_some(())
    }

    /// A string of printable ASCII without escapes (anything else: `None`).
    fn string(&mut self) -> Option<&'a [u8]> {
        self.eat(b'"')?;
        let start = self.i;
        loop {
            match *self.b.get(self.i)? {
                b'"' => break,
                b'\\' => return None,
                0x20..=0x7e => self.i += 1,
                _ => return None,
            }
        }
        self.i += 1;
        Some(&self.b[start..self.i - 1])
    }

    /// A JSON number without a sign (negative values are never valid here:
    /// serde reads and refuses them), checked against JSON's grammar, as
    /// its token, its digits as an integer `m` and the number of digits
    /// after the point `k`, so that the value is `m / 10^k` when there is
    /// no exponent. `m` is `None` past 19 digits.
    fn number(&mut self) -> Option<Number<'a>> {
        self.ws();
        let b = self.b;
        let start = self.i;
        let mut i = start;
        // Digits from `i` on, into `m` (wrapping: only 19 are kept valid).
        let digits = |i: &mut usize, m: &mut u64| {
            let s = *i;
            while let Some(&d) = b.get(*i) {
                if !d.is_ascii_digit() {
                    break;
                }
                *m = m.wrapping_mul(10).wrapping_add(u64::from(d - b'0'));
                *i += 1;
            }
            *i - s
        };
        let mut m = 0u64;
        let mut count = match b.get(i)? {
            b'0' => {
                i += 1;
                0
            }
            b'1'..=b'9' => digits(&mut i, &mut m),
            _ => return None,
        };
        let mut frac = 0;
        if b.get(i) == Some(&b'.') {
            i += 1;
            frac = digits(&mut i, &mut m);
            if frac == 0 {
                return None;
            }
            count += frac;
        }
        let mut exponent = false;
        if let Some(b'e' | b'E') = b.get(i) {
            i += 1;
            exponent = true;
            if let Some(b'+' | b'-') = b.get(i) {
                i += 1;
            }
            if digits(&mut i, &mut 0) == 0 {
                return None;
            }
        }
        self.i = i;
        Some(Number {
            token: &b[start..i],
            m: (count <= 19).then_some(m),
            frac,
            exponent,
        })
    }

    /// An `f64` field: a finite value, correctly rounded as serde_json's
    /// `float_roundtrip` reads it. Up to 15 digits and no exponent, `m` and
    /// `10^k` are exact doubles and one division rounds correctly (Clinger's
    /// fast path); anything else goes to the standard library's parser.
    /// Integers longer than 15 digits are left to serde.
    fn f64(&mut self) -> Option<f64> {
        const POW10: [f64; 16] = [
            1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 1e11, 1e12, 1e13, 1e14, 1e15,
        ];
        let n = self.number()?;
        let integer = n.frac == 0 && !n.exponent;
        if integer && n.token.len() > 15 {
            return None;
        }
        match n.m {
            Some(m) if !n.exponent && m < 1 << 53 && n.frac < POW10.len() => {
                Some(m as f64 / POW10[n.frac])
            }
            _ => std::str::from_utf8(n.token)
                .ok()?
                .parse::<f64>()
                .ok()
                .filter(|v| v.is_finite()),
        }
    }

    /// A `u64` field: an integer token only, as serde requires.
    fn u64(&mut self) -> Option<u64> {
        let n = self.number()?;
        if n.frac == 0 && !n.exponent {
            n.m
        } else {
            None
        }
    }

    fn bar(&mut self) -> Option<Bar> {
        self.eat(b'{')?;
        let (mut t, mut o, mut h, mut l, mut c, mut v, mut n, mut vw) =
            (None, None, None, None, None, None, None, None);
        fn set<T>(slot: &mut Option<T>, v: T) -> Option<()> {
            slot.replace(v).is_none().then_some(())
        }
        loop {
            let key = self.string()?;
            self.eat(b':')?;
            match key {
                b"t" => {
                    let s = self.string()?;
                    let time = match utc_time::parse_fast_bytes(s) {
                        Some(time) => time,
                        None => utc_time::parse(std::str::from_utf8(s).ok()?).ok()?,
                    };
                    set(&mut t, time)?
                }
                b"o" => set(&mut o, self.f64()?)?,
                b"h" => set(&mut h, self.f64()?)?,
                b"l" => set(&mut l, self.f64()?)?,
                b"c" => set(&mut c, self.f64()?)?,
                b"v" => set(&mut v, self.u64()?)?,
                b"n" => set(&mut n, self.u64()?)?,
                b"vw" => set(&mut vw, self.f64()?)?,
                _ => return None,
            }
            match self.next()? {
                b',' => continue,
                b'}' => break,
                _ => return None,
            }
        }
        Some(Bar {
            t: t?,
            o: o?,
            h: h?,
            l: l?,
            c: c?,
            v: v?,
            n: n.unwrap_or(0),
            vw: vw.unwrap_or(0.0),
        })
    }

    fn bars(&mut self) -> Option<Vec<Bar>> {
        self.eat(b'[')?;
        // About 110 bytes a bar: one allocation for the usual message.
        let mut out = Vec::with_capacity((self.b.len() - self.i) / 100 + 1);
        self.ws();
        if self.b.get(self.i) == Some(&b']') {
            self.i += 1;
            return Some(out);
        }
        loop {
            out.push(self.bar()?);
            match self.next()? {
                b',' => continue,
                b']' => return Some(out),
                _ => return None,
            }
        }
    }
}

/// The message, if the payload is in the form this reader knows; `None`
/// leaves it to serde. No validation here: the caller validates both.
pub(crate) fn read(payload: &[u8]) -> Option<BarsMessage> {
    let mut r = Reader { b: payload, i: 0 };
    r.eat(b'{')?;
    let (mut ticker, mut bars) = (None, None);
    loop {
        let key = r.string()?;
        r.eat(b':')?;
        match key {
            b"ticker" if ticker.is_none() => {
                ticker = Some(std::str::from_utf8(r.string()?).ok()?.to_string())
            }
            b"bars" if bars.is_none() => bars = Some(r.bars()?),
            _ => return None,
        }
        match r.next()? {
            b',' => continue,
            b'}' => break,
            _ => return None,
        }
    }
    // Only whitespace may follow, as serde requires.
    r.ws();
    if r.i != payload.len() {
        return None;
    }
    Some(BarsMessage {
        ticker: ticker?,
        bars: bars?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::synthetic::SyntheticMarket;

    fn serde_read(payload: &[u8]) -> Option<BarsMessage> {
        serde_json::from_slice(payload).ok()
    }

    /// Where the direct reader answers, serde answers the same, on valid
    /// messages in several layouts and on thousands of mutations of them
    /// (a byte changed, dropped or doubled), which hit every branch: keys,
    /// escapes, numbers at the edges of the grammar, trailing bytes.
    #[test]
    fn the_direct_reader_agrees_with_serde() {
        let d = |s: &str| s.parse().unwrap();
        let mut bars = SyntheticMarket.bars("AAPL", d("2024-03-04"), d("2024-03-04"));
        bars.truncate(3);
        let msg = BarsMessage {
            ticker: "AAPL".into(),
            bars: bars.clone(),
        };
        let compact = serde_json::to_vec(&msg).unwrap();
        let pretty = serde_json::to_vec_pretty(&msg).unwrap();
        let handmade: &[&[u8]] = &[
            br#"{"bars":[{"vw":1.5,"n":3,"v":100,"c":1.25,"l":1.0,"h":2,"o":1.5e0,"t":"2024-03-04T14:30:00.5Z"}],"ticker":"X"}"#,
            br#"{"ticker":"X","bars":[{"t":"2024-03-04T09:30:00-05:00","o":1,"h":2,"l":0.5,"c":1,"v":0}]}"#,
            br#" { "ticker" : "X" , "bars" : [ ] } "#,
            br#"{"ticker":"X","bars":[{"t":"2024-03-04T14:30:00Z","o":1E+2,"h":1e400,"l":1,"c":1,"v":1}]}"#,
            br#"{"ticker":"X","bars":[{"t":"2024-03-04T14:30:00Z","o":0.1,"h":123456789012345678901,"l":1,"c":1,"v":18446744073709551615}]}"#,
            br#"{"ticker":"X","bars":[{"t":"2024-03-04T14:30:00Z","o":1,"h":1,"l":1,"c":1,"v":18446744073709551616}]}"#,
            br#"{"ticker":"X","bars":[{"t":"2024-03-04T14:30:00Z","o":-0,"h":1,"l":1,"c":1,"v":1.0}]}"#,
            br#"{"ticker":"X","bars":[{"t":"2024-03-04T14:30:00Z","o":1,"h":1,"l":1,"c":1,"v":1,"o":2}]}"#,
            br#"{"ticker":"X\u0041","bars":[]}"#,
            br#"{"ticker":"X","bars":[],"extra":1}"#,
        ];
        let mut inputs: Vec<Vec<u8>> = vec![compact.clone(), pretty.clone()];
        inputs.extend(handmade.iter().map(|h| h.to_vec()));
        let mut seed = 0x853c_49e6_748f_ea9bu64;
        let mut next = |n: usize| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % n as u64) as usize
        };
        let alphabet = b"0123456789.eE+-\"{}[],: \\tZabx";
        for base in [&compact, &pretty] {
            for _ in 0..4000 {
                let mut m = base.clone();
                let at = next(m.len());
                match next(3) {
                    0 => m[at] = alphabet[next(alphabet.len())],
                    1 => {
                        m.remove(at);
                    }
                    _ => m.insert(at, m[at]),
                }
                inputs.push(m);
            }
        }
        let mut direct = 0;
        for input in &inputs {
            if let Some(got) = read(input) {
                direct += 1;
                let want = serde_read(input);
                assert_eq!(
                    Some(&got),
                    want.as_ref(),
                    "{}",
                    String::from_utf8_lossy(input)
                );
                // Bit for bit: -0.0 and 0.0 compare equal.
                for (a, b) in got.bars.iter().zip(&want.unwrap().bars) {
                    for (x, y) in [(a.o, b.o), (a.h, b.h), (a.l, b.l), (a.c, b.c), (a.vw, b.vw)] {
                        assert_eq!(
                            x.to_bits(),
                            y.to_bits(),
                            "{}",
                            String::from_utf8_lossy(input)
                        );
                    }
                }
            }
        }
        assert!(read(&compact).is_some() && read(&pretty).is_some());
        assert!(
            direct > 2000,
            "only {direct} of {} read directly",
            inputs.len()
        );
    }
}
