//! `husk list`: the containers under --root, as a table, as JSON, or only their ids.

use crate::cli::{Format, GlobalArgs, ListArgs};
use crate::container::{list_ids, peek};

pub fn run(global: &GlobalArgs, args: &ListArgs) -> anyhow::Result<()> {
    let records: Vec<_> =
        list_ids(&global.root)?.iter().filter_map(|id| peek(&global.root, id).ok()).collect();
    if args.quiet {
        for r in &records {
            println!("{}", r.id);
        }
        return Ok(());
    }
    match args.format {
        Format::Json => {
            let states: Vec<_> = records.iter().map(|r| r.to_oci_state()).collect();
            // runc prints `null` when there are none.
            if states.is_empty() {
                println!("null");
            } else {
                println!("{}", serde_json::to_string(&states)?);
            }
        }
        Format::Table => {
            let mut rows = vec![["ID", "PID", "STATUS", "BUNDLE", "CREATED", "OWNER"]
                .map(String::from)
                .to_vec()];
            for r in &records {
                let s = r.to_oci_state();
                rows.push(vec![
                    r.id.clone(),
                    s["pid"].to_string(),
                    s["status"].as_str().unwrap_or_default().into(),
                    r.bundle.display().to_string(),
                    r.created.clone(),
                    "root".into(),
                ]);
            }
            print!("{}", table(&rows));
        }
    }
    Ok(())
}

/// Columns as Go's tabwriter lays them out for runc (minimum width 12, padding 3).
pub fn table(rows: &[Vec<String>]) -> String {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|c| rows.iter().filter_map(|r| r.get(c)).map(|s| s.len() + 3).max().unwrap_or(0))
        .map(|w| w.max(12))
        .collect();
    let mut out = String::new();
    for row in rows {
        for (c, cell) in row.iter().enumerate() {
            if c + 1 == row.len() {
                out.push_str(cell);
            } else {
                out.push_str(&format!("{cell:<width$}", width = widths[c]));
            }
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn table_columns_line_up() {
        let rows = vec![
            vec!["ID".to_string(), "PID".into(), "STATUS".into()],
            vec!["a-long-container-id".to_string(), "1".into(), "running".into()],
        ];
        let t = super::table(&rows);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines[0].find("PID"), lines[1].find('1'));
        assert_eq!(lines[0].find("STATUS"), lines[1].find("running"));
        assert!(lines[0].starts_with("ID          "));
    }
}
