//! Plain-text output as the convox CLI prints it: aligned tables and `Key  value` blocks.

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
