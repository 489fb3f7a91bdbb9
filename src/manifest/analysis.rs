//! The parser of a service's `deployment.analysis` (rack's traffic analysis of a rollout):
//! `false` turns it off, `true` or a map of its four settings turns it on.

use serde_yaml_ng::Value;

use super::parser::{Doc, Parsed};
use super::{Analysis, MAX_ANALYSIS_WINDOW};

impl Doc<'_> {
    pub(super) fn analysis(&self, path: &[&str], value: &Value) -> Parsed<Option<Analysis>> {
        let mut analysis = Analysis::default();
        match value {
            Value::Bool(false) => return Ok(None),
            Value::Bool(true) | Value::Null => return Ok(Some(analysis)),
            Value::Mapping(_) => {}
            other => {
                return self.expected(
                    path,
                    "false, true or a map of window, min_requests, max_error_rate and max_latency_ratio",
                    other,
                );
            }
        }
        for (key, value) in self.map(path, value)? {
            let path = &[path, &[key]].concat();
            match key {
                "window" => {
                    analysis.window = self.positive(path, value)?;
                    if analysis.window > MAX_ANALYSIS_WINDOW {
                        return self.fail(path, format!("must be from 1 to {MAX_ANALYSIS_WINDOW} seconds"));
                    }
                }
                "min_requests" => analysis.min_requests = self.positive(path, value)?,
                "max_error_rate" => {
                    analysis.max_error_rate = self.number(path, value)?;
                    if !(0.0..=100.0).contains(&analysis.max_error_rate) {
                        return self.fail(path, "must be a percentage from 0 to 100");
                    }
                }
                "max_latency_ratio" => {
                    analysis.max_latency_ratio = self.number(path, value)?;
                    if analysis.max_latency_ratio < 1.0 {
                        return self.fail(path, "must be a ratio of at least 1");
                    }
                }
                // A new key of rack's own: a typo would silently keep a default, so refuse it.
                _ => {
                    return self.fail(
                        path,
                        "unknown setting: use window, min_requests, max_error_rate or max_latency_ratio",
                    );
                }
            }
        }
        Ok(Some(analysis))
    }

    fn number(&self, path: &[&str], value: &Value) -> Parsed<f64> {
        let n = match value {
            Value::Number(n) => n.as_f64(),
            Value::String(s) => s.trim().parse().ok(),
            _ => None,
        };
        match n {
            Some(n) if n.is_finite() => Ok(n),
            _ => self.expected(path, "a number", value),
        }
    }
}
