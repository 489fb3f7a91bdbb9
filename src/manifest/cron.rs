//! Cron schedules of `timers:`, checked as Kubernetes' CronJob controller reads them
//! (robfig/cron's standard parser): five fields or a macro, so a manifest that passes here is
//! never refused when its CronJob is applied.

use super::is_digits;

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
pub(super) fn check_schedule(schedule: &str) -> Result<(), String> {
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
    for (text, field) in fields.into_iter().zip(&CRON_FIELDS) {
        text.split(',').try_for_each(|item| check_cron_item(item, field))?;
    }
    Ok(())
}

/// One item of a cron field's list: `*`, `n`, `a-b`, each optionally followed by `/step`.
fn check_cron_item(item: &str, field: &CronField) -> Result<(), String> {
    let CronField { name, min, max, .. } = *field;
    let invalid =
        || format!("invalid {name} {item:?}: use *, a number, a range a-b, a step */n or a-b/n, or a list of these");
    let (range, step) = match item.split_once('/') {
        Some((range, step)) => (range, Some(step)),
        None => (item, None),
    };
    if let Some(step) = step {
        if !is_digits(step) {
            return Err(invalid());
        }
        if step.bytes().all(|b| b == b'0') {
            return Err(format!("invalid {name} {item:?}: a step must be at least 1"));
        }
    }
    match range {
        "*" => return Ok(()),
        "?" if field.question => return Ok(()),
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
    let (low, high) = range.split_once('-').unwrap_or((range, range));
    if value(low)? > value(high)? {
        return Err(format!("{name} range {range} starts after it ends"));
    }
    Ok(())
}
