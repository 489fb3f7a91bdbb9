//! What commands print: aligned tables and `Key  value` blocks as the convox CLI prints them,
//! or, with `--json`, the API's own JSON (one object or one array, nothing else on stdout);
//! and progress bars, drawn only on a terminal.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, Ordering};

/// Whether `--json` was given (one process runs one command, so this is set once, first).
static JSON: AtomicBool = AtomicBool::new(false);

/// Chooses JSON output for this process's command.
pub fn set_json(json: bool) {
    JSON.store(json, Ordering::Relaxed);
}

/// Whether the command prints JSON.
pub fn is_json() -> bool {
    JSON.load(Ordering::Relaxed)
}

/// With `--json`, prints `value` (pretty, one document, a final newline) and answers true: the
/// command prints nothing else on stdout. Without it, answers false.
///
/// # Errors
/// Never in practice (a `Value` always serialises).
pub fn json<T: serde::Serialize + ?Sized>(value: &T) -> anyhow::Result<bool> {
    if !is_json() {
        return Ok(false);
    }
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(true)
}

/// A byte-count progress bar on stderr with `template`; hidden when stderr is not a terminal
/// (a CI log, a pipe) so nothing but lines reach it.
pub fn progress(total: u64, template: &str) -> indicatif::ProgressBar {
    if !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(total);
    bar.set_style(
        indicatif::ProgressStyle::with_template(template).unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar
}

/// An aligned table with upper-case headers, columns two spaces apart.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut text = String::new();
        for (i, (cell, width)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                text.push_str(cell);
            } else {
                text.push_str(&format!("{cell:<width$}  "));
            }
        }
        text.truncate(text.trim_end().len());
        text.push('\n');
        text
    };
    let mut out = line(headers.to_vec());
    for row in rows {
        out.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    out
}

/// `Key  value` lines with the values aligned.
pub fn info(pairs: &[(&str, String)]) -> String {
    let width = pairs.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    pairs.iter().map(|(k, v)| format!("{k:<width$}  {v}\n")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_columns() {
        let rows = vec![
            vec!["web".to_owned(), "running".to_owned()],
            vec!["a".to_owned(), "x".to_owned()],
        ];
        assert_eq!(table(&["APP", "STATUS"], &rows), "APP  STATUS\nweb  running\na    x\n");
    }

    #[test]
    fn info_aligns_values() {
        assert_eq!(
            info(&[("Name", "a".into()), ("Status", "b".into())]),
            "Name    a\nStatus  b\n"
        );
    }
}
