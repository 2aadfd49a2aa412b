//! The NYSE trading calendar: which days trade and when the regular session
//! opens and closes (09:30–16:00 America/New_York, 13:00 on early-close days).
//!
//! Holidays follow the exchange's rules: New Year's Day, Martin Luther King Jr.
//! Day, Washington's Birthday, Good Friday, Memorial Day, Juneteenth (from
//! 2022), Independence Day, Labor Day, Thanksgiving and Christmas, with the
//! Saturday→Friday / Sunday→Monday observance (except that New Year's Day on a
//! Saturday is not observed on the Friday before). Early closes (13:00) are
//! the day after Thanksgiving, Christmas Eve and July 3 when they trade.
//!
//! The exchange's one-off decisions are listed in [`SPECIAL_CLOSURES`] and
//! [`SPECIAL_EARLY_CLOSES`] (2000 on). The test `tests/xnys.rs` compares every
//! weekday from 2000 to 2026, and each early close, with the
//! `exchange-calendars` package's XNYS calendar (a maintained, published
//! record of NYSE holidays and closures); a year beyond the list follows the
//! rules alone until the exchange announces its next one-off.

use chrono::{DateTime, Datelike, Duration, NaiveDate, NaiveTime, TimeZone, Utc, Weekday};
use chrono_tz::America::New_York;

fn nth_weekday(year: i32, month: u32, wd: Weekday, n: u8) -> NaiveDate {
    NaiveDate::from_weekday_of_month_opt(year, month, wd, n).expect("valid nth weekday")
}

fn last_weekday(year: i32, month: u32, wd: Weekday) -> NaiveDate {
    let next_month = if month == 12 {
        NaiveDate::from_ymd_opt(year + 1, 1, 1)
    } else {
        NaiveDate::from_ymd_opt(year, month + 1, 1)
    }
    .expect("valid date");
    let mut d = next_month - Duration::days(1);
    while d.weekday() != wd {
        d -= Duration::days(1);
    }
    d
}

/// Easter Sunday (Gregorian, anonymous algorithm).
fn easter(year: i32) -> NaiveDate {
    let a = year % 19;
    let b = year / 100;
    let c = year % 100;
    let d = b / 4;
    let e = b % 4;
    let f = (b + 8) / 25;
    let g = (b - f + 1) / 3;
    let h = (19 * a + b - d - g + 15) % 30;
    let i = c / 4;
    let k = c % 4;
    let l = (32 + 2 * e + 2 * i - h - k) % 7;
    let m = (a + 11 * h + 22 * l) / 451;
    let month = (h + l - 7 * m + 114) / 31;
    let day = (h + l - 7 * m + 114) % 31 + 1;
    NaiveDate::from_ymd_opt(year, month as u32, day as u32).expect("valid easter")
}

fn observed(d: NaiveDate) -> NaiveDate {
    match d.weekday() {
        Weekday::Sat => d - Duration::days(1),
        Weekday::Sun => d + Duration::days(1),
        _ => d,
    }
}

/// A calendar date as (year, month, day).
pub type Ymd = (i32, u32, u32);

/// Days the NYSE closed outside its holiday rules, with the reason.
pub const SPECIAL_CLOSURES: &[(Ymd, &str)] = &[
    ((2001, 9, 11), "September 11 attacks"),
    ((2001, 9, 12), "September 11 attacks"),
    ((2001, 9, 13), "September 11 attacks"),
    ((2001, 9, 14), "September 11 attacks"),
    ((2004, 6, 11), "national day of mourning for Ronald Reagan"),
    ((2007, 1, 2), "national day of mourning for Gerald Ford"),
    ((2012, 10, 29), "Hurricane Sandy"),
    ((2012, 10, 30), "Hurricane Sandy"),
    (
        (2018, 12, 5),
        "national day of mourning for George H. W. Bush",
    ),
    ((2025, 1, 9), "national day of mourning for Jimmy Carter"),
];

/// Early closes (13:00) outside the rules: `(date, true)` adds one,
/// `(date, false)` removes the rule's.
pub const SPECIAL_EARLY_CLOSES: &[(Ymd, bool)] = &[
    // In 2002 the exchange closed early on Friday July 5 instead of Wednesday July 3.
    ((2002, 7, 3), false),
    ((2002, 7, 5), true),
    ((2003, 12, 26), true),
];

fn listed<T: Copy>(list: &[(Ymd, T)], d: NaiveDate) -> Option<T> {
    let ymd = (d.year(), d.month(), d.day());
    list.iter().find(|(day, _)| *day == ymd).map(|(_, v)| *v)
}

/// Why the NYSE closed on `d` outside its rules, when it did.
pub fn special_closure(d: NaiveDate) -> Option<&'static str> {
    listed(SPECIAL_CLOSURES, d)
}

/// True when the NYSE is closed all day for a holiday (or a one-off closure) on `d`.
pub fn is_holiday(d: NaiveDate) -> bool {
    if special_closure(d).is_some() {
        return true;
    }
    let y = d.year();
    let ymd = |m, day| NaiveDate::from_ymd_opt(y, m, day).expect("valid date");
    let new_year = ymd(1, 1);
    let mut days = vec![
        nth_weekday(y, 1, Weekday::Mon, 3),
        nth_weekday(y, 2, Weekday::Mon, 3),
        easter(y) - Duration::days(2),
        last_weekday(y, 5, Weekday::Mon),
        observed(ymd(7, 4)),
        nth_weekday(y, 9, Weekday::Mon, 1),
        nth_weekday(y, 11, Weekday::Thu, 4),
        observed(ymd(12, 25)),
    ];
    if new_year.weekday() != Weekday::Sat {
        days.push(observed(new_year));
    }
    if y >= 2022 {
        days.push(observed(ymd(6, 19)));
    }
    days.contains(&d)
}

/// True when `d` is a regular NYSE trading day.
pub fn is_trading_day(d: NaiveDate) -> bool {
    !matches!(d.weekday(), Weekday::Sat | Weekday::Sun) && !is_holiday(d)
}

/// True when the session on `d` closes early, at 13:00.
pub fn is_early_close(d: NaiveDate) -> bool {
    if !is_trading_day(d) {
        return false;
    }
    let y = d.year();
    let day_after_thanksgiving = nth_weekday(y, 11, Weekday::Thu, 4) + Duration::days(1);
    let christmas_eve = NaiveDate::from_ymd_opt(y, 12, 24).expect("valid date");
    let july_3 = NaiveDate::from_ymd_opt(y, 7, 3).expect("valid date");
    listed(SPECIAL_EARLY_CLOSES, d)
        .unwrap_or(d == day_after_thanksgiving || d == christmas_eve || d == july_3)
}

/// The regular session of a trading day, `[open, close)` in UTC.
pub fn session(d: NaiveDate) -> Option<(DateTime<Utc>, DateTime<Utc>)> {
    if !is_trading_day(d) {
        return None;
    }
    let close = if is_early_close(d) {
        NaiveTime::from_hms_opt(13, 0, 0)
    } else {
        NaiveTime::from_hms_opt(16, 0, 0)
    }
    .expect("valid time");
    let open = NaiveTime::from_hms_opt(9, 30, 0).expect("valid time");
    let to_utc = |t: NaiveTime| {
        New_York
            .from_local_datetime(&d.and_time(t))
            .single()
            .expect("09:30 and 16:00 are never ambiguous in New York")
            .with_timezone(&Utc)
    };
    Some((to_utc(open), to_utc(close)))
}

/// The trading days in `[from, to]`, inclusive.
pub fn trading_days(from: NaiveDate, to: NaiveDate) -> impl Iterator<Item = NaiveDate> {
    from.iter_days()
        .take_while(move |d| *d <= to)
        .filter(|d| is_trading_day(*d))
}

/// The instant a New York calendar day starts (DST changes at 02:00, so
/// midnight always exists and is never ambiguous there).
pub fn ny_midnight(d: NaiveDate) -> DateTime<Utc> {
    New_York
        .from_local_datetime(&d.and_time(NaiveTime::MIN))
        .earliest()
        .expect("midnight exists in New York")
        .with_timezone(&Utc)
}

/// The New York calendar date of an instant.
pub fn ny_date(t: DateTime<Utc>) -> NaiveDate {
    t.with_timezone(&New_York).date_naive()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(s: &str) -> NaiveDate {
        s.parse().unwrap()
    }

    #[test]
    fn known_holidays_2024() {
        for h in [
            "2024-01-01",
            "2024-01-15",
            "2024-02-19",
            "2024-03-29",
            "2024-05-27",
            "2024-06-19",
            "2024-07-04",
            "2024-09-02",
            "2024-11-28",
            "2024-12-25",
        ] {
            assert!(is_holiday(d(h)), "{h}");
        }
        assert!(is_trading_day(d("2024-07-05")));
        assert!(is_early_close(d("2024-11-29")));
        // 2022-01-01 was a Saturday: not observed on Friday 2021-12-31.
        assert!(is_trading_day(d("2021-12-31")));
        // Juneteenth 2021 did not exist yet for the exchange.
        assert!(is_trading_day(d("2021-06-18")));
    }

    #[test]
    fn one_off_closures() {
        for s in [
            "2012-10-29",
            "2012-10-30",
            "2018-12-05",
            "2025-01-09",
            "2001-09-11",
        ] {
            assert!(!is_trading_day(d(s)), "{s}");
            assert!(session(d(s)).is_none(), "{s}");
        }
        assert_eq!(special_closure(d("2012-10-29")), Some("Hurricane Sandy"));
        assert!(is_trading_day(d("2012-10-31")));
        assert!(is_early_close(d("2003-12-26")) && is_early_close(d("2002-07-05")));
        assert!(!is_early_close(d("2002-07-03")) && is_trading_day(d("2002-07-03")));
        let days = SPECIAL_CLOSURES.iter().map(|(d, _)| *d);
        for (y, m, day) in days.chain(SPECIAL_EARLY_CLOSES.iter().map(|(d, _)| *d)) {
            assert!(
                NaiveDate::from_ymd_opt(y, m, day).is_some(),
                "{y}-{m}-{day}"
            );
        }
    }

    #[test]
    fn session_follows_daylight_saving() {
        let (open, close) = session(d("2024-01-02")).unwrap();
        assert_eq!(open.to_rfc3339(), "2024-01-02T14:30:00+00:00");
        assert_eq!(close.to_rfc3339(), "2024-01-02T21:00:00+00:00");
        let (open, _) = session(d("2024-07-01")).unwrap();
        assert_eq!(open.to_rfc3339(), "2024-07-01T13:30:00+00:00");
        assert_eq!(trading_days(d("2024-01-01"), d("2024-01-31")).count(), 21);
    }
}
