//! Cron schedules of `timers:`, checked as Kubernetes' CronJob controller reads them
//! (robfig/cron's standard parser): five fields or a macro, so a manifest that passes here is
//! never refused when its CronJob is applied.

use super::checks::is_digits;

/// One field of a cron expression.
struct CronField {
    name: &'static str,
    min: u32,
    max: u32,
    /// Names of the values from `min` on, matched without regard to case.
    names: &'static [&'static str],
    /// Whether `?` (any) may stand for `*`, as robfig/cron (which Kubernetes uses) allows.
    question: bool,
}

const CRON_FIELDS: [CronField; 5] = [
    CronField {
        name: "minute",
        min: 0,
        max: 59,
        names: &[],
        question: false,
    },
    CronField {
        name: "hour",
        min: 0,
        max: 23,
        names: &[],
        question: false,
    },
    CronField {
        name: "day of month",
        min: 1,
        max: 31,
        names: &[],
        question: true,
    },
    CronField {
        name: "month",
        min: 1,
        max: 12,
        names: &[
            "jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec",
        ],
        question: false,
    },
    // robfig/cron, which Kubernetes uses, numbers the days 0-6 and refuses 7 for Sunday.
    CronField {
        name: "day of week",
        min: 0,
        max: 6,
        names: &["sun", "mon", "tue", "wed", "thu", "fri", "sat"],
        question: true,
    },
];

const CRON_MACROS: [&str; 7] = [
    "@yearly",
    "@annually",
    "@monthly",
    "@weekly",
    "@daily",
    "@midnight",
    "@hourly",
];

/// Checks a cron expression whose fields are separated by single spaces; the error says why
/// it is refused.
pub fn check_schedule(schedule: &str) -> Result<(), String> {
    if schedule.starts_with('@') {
        if CRON_MACROS.contains(&schedule) {
            return Ok(());
        }
        return Err(format!("unknown macro: use {} or 5 fields", CRON_MACROS.join(", ")));
    }
    let fields: Vec<&str> = schedule.split(' ').collect();
    if fields.len() != 5 {
        let count = if schedule.is_empty() { 0 } else { fields.len() };
        return Err(format!(
            "expected 5 fields (minute, hour, day of month, month, day of week) or a macro such as @daily, got {count}"
        ));
    }
    let mut values = [0_u64; 5];
    for ((text, field), values) in fields.iter().zip(&CRON_FIELDS).zip(&mut values) {
        for item in text.split(',') {
            *values |= check_cron_item(item, field)?;
        }
    }
    // A schedule can pass every field and still name no time at all (February 30): it would
    // never run, silently. The day of week restricts nothing when it is `*` (then the day of
    // month alone decides, as in robfig/cron and croner); otherwise either may match.
    let [_, _, days, months, _] = values;
    let any_weekday = fields[4].starts_with(['*', '?']) && values[4] == mask(0, 6);
    let some_day = (1..=12_u32)
        .filter(|month| months & (1 << month) != 0)
        .any(|month| days & mask(1, days_in(month)) != 0);
    if any_weekday && !some_day {
        return Err(format!(
            "it never runs: no month of {:?} has a day {:?}",
            fields[3], fields[2]
        ));
    }
    Ok(())
}

/// The most days `month` has (February: 29, in leap years).
fn days_in(month: u32) -> u32 {
    match month {
        2 => 29,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// The bits of the values `low..=high`.
fn mask(low: u32, high: u32) -> u64 {
    (low..=high).fold(0, |bits, n| bits | (1 << n))
}

/// One item of a cron field's list: `*`, `n`, `a-b`, each optionally followed by `/step`;
/// returns the values it names, as bits.
fn check_cron_item(item: &str, field: &CronField) -> Result<u64, String> {
    let CronField { name, min, max, .. } = *field;
    let invalid =
        || format!("invalid {name} {item:?}: use *, a number, a range a-b, a step */n or a-b/n, or a list of these");
    let (range, step) = match item.split_once('/') {
        Some((range, step)) => (range, Some(step)),
        None => (item, None),
    };
    let step = match step {
        None => 1,
        Some(step) if !is_digits(step) => return Err(invalid()),
        Some(step) if step.bytes().all(|b| b == b'0') => {
            return Err(format!("invalid {name} {item:?}: a step must be at least 1"));
        }
        // Larger than the field's span, a step names only its start; far larger, the local
        // scheduler's parser (croner) cannot read it and the timer would never run.
        Some(step) => match step.parse::<u32>() {
            Ok(step) if step <= max - min + 1 => step,
            _ => {
                return Err(format!(
                    "invalid {name} {item:?}: a step must be at most {}, the number of values of {name} ({min}-{max})",
                    max - min + 1
                ));
            }
        },
    };
    let stepped = |low: u32, high: u32| (low..=high).step_by(step as usize).fold(0, |bits, n| bits | (1 << n));
    match range {
        "*" => return Ok(stepped(min, max)),
        "?" if field.question => return Ok(stepped(min, max)),
        "?" => return Err(format!("{name} cannot be ?: only day of month and day of week can")),
        _ => {}
    }
    let value = |text: &str| {
        let named = (min..).zip(field.names).find(|(_, n)| n.eq_ignore_ascii_case(text));
        let n = match named {
            Some((n, _)) => n,
            // Too many digits for a u32 is out of range too.
            None if is_digits(text) => text.parse().unwrap_or(u32::MAX),
            None => return Err(invalid()),
        };
        if !(min..=max).contains(&n) {
            let hint = if name == "day of week" && n == 7 {
                " (0 or SUN is Sunday)"
            } else {
                ""
            };
            return Err(format!("{name} {text} is out of range {min}-{max}{hint}"));
        }
        Ok(n)
    };
    let (low, high) = match range.split_once('-') {
        Some((low, high)) => (value(low)?, value(high)?),
        // `n/step` runs from n to the end of the field, as robfig/cron reads it.
        None if item.contains('/') => (value(range)?, max),
        None => (value(range)?, value(range)?),
    };
    if low > high {
        return Err(format!("{name} range {range} starts after it ends"));
    }
    Ok(stepped(low, high))
}

#[cfg(test)]
mod tests {
    use std::str::FromStr as _;

    /// What passes here, the local scheduler (croner, in `jobs::timers`) can run: it parses
    /// it and finds a next time.
    #[test]
    fn accepted_schedules_run_on_the_local_scheduler() {
        let now = chrono::Utc::now();
        for schedule in [
            "*/60 * * * *",
            "59/60 23/24 31/31 12/12 6/7",
            "0 0 29 2 *",
            "0 0 30 2 1",
            "0-59/7 0,12 1-31/2 * ?",
            "*/15 9-17 ? JAN-jun,dec MON-FRI",
        ] {
            super::check_schedule(schedule).unwrap_or_else(|e| panic!("{schedule}: {e}"));
            let cron = croner::Cron::from_str(schedule).unwrap_or_else(|e| panic!("{schedule}: {e}"));
            assert!(cron.find_next_occurrence(&now, false).is_ok(), "{schedule}");
        }
    }
}
