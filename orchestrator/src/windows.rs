//! Maintenance windows: on given weekdays, from a local start time to a local end time in an
//! IANA time zone. A window whose end is not after its start runs across midnight (it belongs
//! to the day it starts); an end equal to the start makes it 24 hours long (`00:00` to
//! `00:00` every day: always open). Daylight-saving changes follow the zone's rules: a start inside a
//! skipped hour moves to the hour's end, an ambiguous one takes the earlier instant.

use jiff::civil::{Date, Time, Weekday};
use jiff::tz::TimeZone;
use jiff::{Timestamp, ToSpan};

/// One maintenance window, parsed and checked.
#[derive(Debug, Clone, PartialEq)]
pub struct Window {
    /// Days the window starts on.
    pub days: Vec<Weekday>,
    /// Local start time.
    pub start: Time,
    /// Local end time (on the next day when not after `start`).
    pub end: Time,
    /// The zone `start` and `end` are read in.
    pub tz: TimeZone,
    /// The zone's name, for messages.
    pub tz_name: String,
}

/// A concrete opening of a window: `[start, end)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Opening {
    /// When it opens.
    pub start: Timestamp,
    /// When it closes.
    pub end: Timestamp,
}

/// Why a window is impossible.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WindowError {
    /// A day name is not a weekday.
    #[error("unknown day '{0}': use mon, tue, wed, thu, fri, sat, sun")]
    Day(String),
    /// No day at all.
    #[error("a window needs at least one day")]
    NoDay,
    /// A time is not HH:MM.
    #[error("invalid time '{0}': use HH:MM, 00:00 to 23:59")]
    Time(String),
    /// Unknown time zone.
    #[error("unknown time zone '{0}': use an IANA name such as Europe/Paris")]
    Zone(String),
}

fn weekday(name: &str) -> Result<Weekday, WindowError> {
    Ok(match name.to_ascii_lowercase().as_str() {
        "mon" | "monday" => Weekday::Monday,
        "tue" | "tuesday" => Weekday::Tuesday,
        "wed" | "wednesday" => Weekday::Wednesday,
        "thu" | "thursday" => Weekday::Thursday,
        "fri" | "friday" => Weekday::Friday,
        "sat" | "saturday" => Weekday::Saturday,
        "sun" | "sunday" => Weekday::Sunday,
        _ => return Err(WindowError::Day(name.to_string())),
    })
}

fn hhmm(text: &str) -> Result<Time, WindowError> {
    let bad = || WindowError::Time(text.to_string());
    let (h, m) = text.split_once(':').ok_or_else(bad)?;
    if h.len() != 2 || m.len() != 2 {
        return Err(bad());
    }
    let (h, m): (i8, i8) = (h.parse().map_err(|_| bad())?, m.parse().map_err(|_| bad())?);
    Time::new(h, m, 0, 0).map_err(|_| bad())
}

impl Window {
    /// Parses a window from the fleet file's words.
    pub fn parse(days: &[String], start: &str, end: &str, tz: &str) -> Result<Self, WindowError> {
        if days.is_empty() {
            return Err(WindowError::NoDay);
        }
        let days = days
            .iter()
            .map(|d| weekday(d))
            .collect::<Result<Vec<_>, _>>()?;
        let (start_t, end_t) = (hhmm(start)?, hhmm(end)?);
        let zone = TimeZone::get(tz).map_err(|_| WindowError::Zone(tz.to_string()))?;
        Ok(Window {
            days,
            start: start_t,
            end: end_t,
            tz: zone,
            tz_name: tz.to_string(),
        })
    }

    /// The opening that starts on local date `date`, if the window runs that day.
    fn opening_on(&self, date: Date) -> Option<Opening> {
        if !self.days.contains(&date.weekday()) {
            return None;
        }
        let end_date = if self.end > self.start {
            date
        } else {
            date.checked_add(1.day()).ok()?
        };
        let start = self
            .tz
            .to_ambiguous_zoned(date.to_datetime(self.start))
            .compatible()
            .ok()?;
        let end = self
            .tz
            .to_ambiguous_zoned(end_date.to_datetime(self.end))
            .compatible()
            .ok()?;
        (end.timestamp() > start.timestamp()).then(|| Opening {
            start: start.timestamp(),
            end: end.timestamp(),
        })
    }

    /// The openings that could contain or follow `at`, in order.
    fn openings_around(&self, at: Timestamp) -> impl Iterator<Item = Opening> + '_ {
        let today = at.to_zoned(self.tz.clone()).date();
        (-1i64..=8).filter_map(move |offset| {
            today
                .checked_add(offset.days())
                .ok()
                .and_then(|d| self.opening_on(d))
        })
    }

    /// The opening `at` falls in, if any.
    pub fn open_at(&self, at: Timestamp) -> Option<Opening> {
        self.openings_around(at)
            .find(|o| o.start <= at && at < o.end)
    }

    /// The opening `at` falls in, or else the next one.
    pub fn next_opening(&self, at: Timestamp) -> Option<Opening> {
        self.openings_around(at).find(|o| at < o.end)
    }
}

/// Whether two lists of windows are the same: the same list (by address: instances share the
/// fleet's), else equal (comparing time zones is slow).
pub fn same(a: &[Window], b: &[Window]) -> bool {
    std::ptr::eq(a, b) || a == b
}

/// The opening (of any of `windows`) that `at` falls in, the one closing last if several.
pub fn open_at(windows: &[Window], at: Timestamp) -> Option<Opening> {
    windows
        .iter()
        .filter_map(|w| w.open_at(at))
        .max_by_key(|o| o.end)
}

/// The earliest opening of any of `windows` at or after `at` (possibly already open).
pub fn next_opening(windows: &[Window], at: Timestamp) -> Option<Opening> {
    windows
        .iter()
        .filter_map(|w| w.next_opening(at))
        .min_by_key(|o| (o.start.max(at), std::cmp::Reverse(o.end)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn window(days: &[&str], start: &str, end: &str, tz: &str) -> Window {
        let days: Vec<String> = days.iter().map(|d| d.to_string()).collect();
        Window::parse(&days, start, end, tz).unwrap()
    }

    fn ts(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    #[test]
    fn an_end_equal_to_the_start_is_a_whole_day() {
        let w = window(&["mon", "tue"], "00:00", "00:00", "UTC");
        // Monday 2026-01-05.
        assert_eq!(
            w.open_at(ts("2026-01-05T13:00:00Z")),
            Some(Opening {
                start: ts("2026-01-05T00:00:00Z"),
                end: ts("2026-01-06T00:00:00Z")
            })
        );
        assert_eq!(
            w.open_at(ts("2026-01-06T23:59:00Z")).map(|o| o.end),
            Some(ts("2026-01-07T00:00:00Z"))
        );
        assert_eq!(
            w.open_at(ts("2026-01-07T00:00:00Z")),
            None,
            "Wednesday is not"
        );
        let evening = window(&["fri"], "18:00", "18:00", "UTC");
        assert_eq!(
            evening.open_at(ts("2026-01-10T09:00:00Z")).map(|o| o.end),
            Some(ts("2026-01-10T18:00:00Z")),
            "Friday 18:00 to Saturday 18:00"
        );
    }

    #[test]
    fn a_night_window_runs_across_midnight_and_belongs_to_its_start_day() {
        // Friday 22:00 to Saturday 05:00, Paris (UTC+1 in January).
        let w = window(&["fri"], "22:00", "05:00", "Europe/Paris");
        let inside = ts("2026-01-10T02:00:00Z"); // Saturday 03:00 Paris
        assert_eq!(
            w.open_at(inside),
            Some(Opening {
                start: ts("2026-01-09T21:00:00Z"),
                end: ts("2026-01-10T04:00:00Z")
            })
        );
        assert_eq!(
            w.open_at(ts("2026-01-10T04:00:00Z")),
            None,
            "the end is exclusive"
        );
        assert_eq!(
            w.open_at(ts("2026-01-10T21:30:00Z")),
            None,
            "Saturday night is not a window"
        );
        assert_eq!(
            w.next_opening(ts("2026-01-10T05:00:00Z")).map(|o| o.start),
            Some(ts("2026-01-16T21:00:00Z"))
        );
    }

    #[test]
    fn windows_follow_daylight_saving_time() {
        // Europe/Paris leaves DST on Sunday 2026-10-25 (03:00 CEST -> 02:00 CET).
        let w = window(&["sat", "sun"], "01:00", "04:00", "Europe/Paris");
        let sunday = w.next_opening(ts("2026-10-24T12:00:00Z")).unwrap();
        // Sunday 01:00 CEST = 23:00Z Saturday; 04:00 CET = 03:00Z: four real hours.
        assert_eq!(sunday.start, ts("2026-10-24T23:00:00Z"));
        assert_eq!(sunday.end, ts("2026-10-25T03:00:00Z"));
        // Spring forward, Sunday 2026-03-29: 02:00-03:00 does not exist in Paris. A window
        // starting in the gap starts at its end; 02:30-04:00 lasts half an hour that night.
        let w = window(&["sun"], "02:30", "04:00", "Europe/Paris");
        let o = w.next_opening(ts("2026-03-28T12:00:00Z")).unwrap();
        assert_eq!(o.start, ts("2026-03-29T01:30:00Z"));
        assert_eq!(o.end, ts("2026-03-29T02:00:00Z"));
        // 02:15-03:00 falls wholly in the gap: no window that night, the next one a week later.
        let w = window(&["sun"], "02:15", "03:00", "Europe/Paris");
        let o = w.next_opening(ts("2026-03-28T12:00:00Z")).unwrap();
        assert_eq!(o.start, ts("2026-04-05T00:15:00Z"));
    }

    #[test]
    fn two_zones_are_read_each_in_its_own_time() {
        let paris = window(&["mon"], "22:00", "23:00", "Europe/Paris");
        let montreal = window(&["mon"], "22:00", "23:00", "America/Montreal");
        let at = ts("2026-06-01T20:30:00Z"); // Monday 22:30 Paris, 16:30 Montreal
        assert!(paris.open_at(at).is_some());
        assert!(montreal.open_at(at).is_none());
        let both = [paris, montreal];
        assert_eq!(
            open_at(&both, at).map(|o| o.end),
            Some(ts("2026-06-01T21:00:00Z"))
        );
        assert_eq!(
            next_opening(&both, ts("2026-06-01T21:30:00Z")).map(|o| o.start),
            Some(ts("2026-06-02T02:00:00Z"))
        );
    }

    #[test]
    fn impossible_windows_are_refused() {
        let days = vec!["mon".to_string()];
        assert_eq!(
            Window::parse(&[], "01:00", "02:00", "UTC"),
            Err(WindowError::NoDay)
        );
        assert!(matches!(
            Window::parse(&["mo".into()], "01:00", "02:00", "UTC"),
            Err(WindowError::Day(_))
        ));
        assert!(matches!(
            Window::parse(&days, "24:00", "02:00", "UTC"),
            Err(WindowError::Time(_))
        ));
        assert!(matches!(
            Window::parse(&days, "1:00", "02:00", "UTC"),
            Err(WindowError::Time(_))
        ));
        assert!(matches!(
            Window::parse(&days, "01:00", "02:00", "Mars/Olympus"),
            Err(WindowError::Zone(_))
        ));
    }
}
