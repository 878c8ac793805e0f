//! A run's figures: tables of cells, printed for the terminal and written
//! as Markdown and JSON.

use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use serde_json::{Map, Value, json};

use crate::machine::Machine;

/// Where the generated part of `docs/benchmarks.md` begins.
pub const BEGIN: &str = "<!-- results:begin (written by soma-bench; edit outside these marks) -->";
/// Where it ends.
pub const END: &str = "<!-- results:end -->";

/// One value of a table.
#[derive(Clone, Debug)]
pub enum Cell {
    /// A number shown with `decimals` decimals and thousands separators.
    Num { value: f64, decimals: usize },
    /// A ratio against a reference, in bold in Markdown.
    Ratio(f64),
    /// Text.
    Text(String),
    /// Nothing to show.
    Empty,
}

impl Cell {
    /// A whole number.
    pub fn int(value: impl Into<f64>) -> Cell {
        Cell::Num {
            value: value.into(),
            decimals: 0,
        }
    }

    /// A number with `decimals` decimals.
    pub fn num(value: f64, decimals: usize) -> Cell {
        Cell::Num { value, decimals }
    }

    /// Seconds, two decimals.
    pub fn secs(d: Duration) -> Cell {
        Cell::num(d.as_secs_f64(), 2)
    }

    /// Milliseconds, two decimals.
    pub fn ms(d: Duration) -> Cell {
        Cell::num(d.as_secs_f64() * 1e3, 2)
    }

    /// A count per second over `d`.
    pub fn rate(count: f64, d: Duration) -> Cell {
        Cell::int((count / d.as_secs_f64()).round())
    }

    /// Text.
    pub fn text(s: impl Into<String>) -> Cell {
        Cell::Text(s.into())
    }

    fn show(&self, markdown: bool) -> String {
        match self {
            Cell::Num { value, decimals } => group(*value, *decimals),
            Cell::Ratio(r) if markdown => format!("**{r:.3}**"),
            Cell::Ratio(r) => format!("{r:.3}"),
            Cell::Text(t) => t.clone(),
            Cell::Empty => "–".to_string(),
        }
    }

    fn to_json(&self) -> Value {
        match self {
            Cell::Num { value, .. } | Cell::Ratio(value) => json!(value),
            Cell::Text(t) => json!(t),
            Cell::Empty => Value::Null,
        }
    }
}

/// `value` rounded to `decimals`, with a comma every three digits.
fn group(value: f64, decimals: usize) -> String {
    if !value.is_finite() {
        return value.to_string();
    }
    let text = format!("{:.*}", decimals, value.abs());
    let (whole, fraction) = text.split_once('.').unwrap_or((&text, ""));
    let mut out = String::new();
    for (i, c) in whole.chars().enumerate() {
        if i > 0 && (whole.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    if !fraction.is_empty() {
        out.push('.');
        out.push_str(fraction);
    }
    if value < 0.0 {
        out.insert(0, '-');
    }
    out
}

/// A table of figures: one benchmark.
#[derive(Clone, Debug)]
pub struct Section {
    /// A stable name (`sync`, `verifier`, ...), the JSON key.
    pub key: &'static str,
    /// The heading.
    pub title: String,
    /// What was measured, how, and against what.
    pub setup: String,
    /// Column names; the first names the row labels.
    pub columns: Vec<String>,
    /// Rows: a label and one cell per further column.
    pub rows: Vec<(String, Vec<Cell>)>,
    /// Lines printed under the table.
    pub notes: Vec<String>,
}

impl Section {
    /// A section with its columns and no rows yet.
    pub fn new(key: &'static str, title: &str, setup: String, columns: &[&str]) -> Self {
        Section {
            key,
            title: title.to_string(),
            setup,
            columns: columns.iter().map(|c| c.to_string()).collect(),
            rows: Vec::new(),
            notes: Vec::new(),
        }
    }

    /// Adds a row; `cells` has one cell per column after the first.
    pub fn row(&mut self, label: impl Into<String>, cells: Vec<Cell>) {
        assert_eq!(
            cells.len() + 1,
            self.columns.len(),
            "a row of {} has one cell per column",
            self.key
        );
        self.rows.push((label.into(), cells));
    }

    /// The table for a terminal.
    pub fn text(&self) -> String {
        let shown: Vec<Vec<String>> = self
            .rows
            .iter()
            .map(|(label, cells)| {
                std::iter::once(label.clone())
                    .chain(cells.iter().map(|c| c.show(false)))
                    .collect()
            })
            .collect();
        let widths: Vec<usize> = (0..self.columns.len())
            .map(|i| {
                shown
                    .iter()
                    .map(|r| r[i].chars().count())
                    .chain([self.columns[i].chars().count()])
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let line = |cells: &[String]| {
            let mut out = String::new();
            for (i, c) in cells.iter().enumerate() {
                let pad = widths[i] - c.chars().count();
                if i == 0 {
                    write!(out, "{c}{}", " ".repeat(pad)).unwrap();
                } else {
                    write!(out, "  {}{c}", " ".repeat(pad)).unwrap();
                }
            }
            out.trim_end().to_string()
        };
        let mut out = format!("== {}\n{}\n", self.title, self.setup);
        out.push_str(&line(&self.columns));
        out.push('\n');
        for r in &shown {
            out.push_str(&line(r));
            out.push('\n');
        }
        for n in &self.notes {
            out.push_str(n);
            out.push('\n');
        }
        out
    }

    fn markdown(&self) -> String {
        let mut out = format!("### {}\n\n{}\n\n", self.title, self.setup);
        out.push_str(&format!("| {} |\n", self.columns.join(" | ")));
        out.push_str(&format!(
            "|{}\n",
            self.columns
                .iter()
                .enumerate()
                .map(|(i, _)| if i == 0 { "---|" } else { "---:|" })
                .collect::<String>()
        ));
        for (label, cells) in &self.rows {
            let cells: Vec<String> = cells.iter().map(|c| c.show(true)).collect();
            out.push_str(&format!("| {label} | {} |\n", cells.join(" | ")));
        }
        if !self.notes.is_empty() {
            out.push('\n');
            for n in &self.notes {
                out.push_str(n);
                out.push('\n');
            }
        }
        out
    }

    fn to_json(&self) -> Value {
        let rows: Vec<Value> = self
            .rows
            .iter()
            .map(|(label, cells)| {
                let mut values = Map::new();
                for (name, cell) in self.columns[1..].iter().zip(cells) {
                    values.insert(name.clone(), cell.to_json());
                }
                json!({ "label": label, "values": values })
            })
            .collect();
        json!({
            "title": self.title,
            "setup": self.setup,
            "rows": rows,
            "notes": self.notes,
        })
    }
}

/// Everything one run measured.
#[derive(Debug)]
pub struct Report {
    /// Where it ran.
    pub machine: Machine,
    /// `quick` or `full`.
    pub mode: &'static str,
    /// The benchmarks, in the order run.
    pub sections: Vec<Section>,
    /// Wall time of the whole run.
    pub elapsed: Duration,
}

impl Report {
    /// The generated Markdown (what goes between [`BEGIN`] and [`END`]).
    pub fn markdown(&self) -> String {
        let mut out = format!(
            "Run: `{}` mode, {:.0} s in all. Machine: {}.\n\n",
            self.mode,
            self.elapsed.as_secs_f64(),
            self.machine.summary()
        );
        for s in &self.sections {
            out.push_str(&s.markdown());
            out.push('\n');
        }
        out
    }

    /// The JSON form: machine, mode and every section's rows by column.
    pub fn to_json(&self) -> Value {
        let mut sections = Map::new();
        for s in &self.sections {
            sections.insert(s.key.to_string(), s.to_json());
        }
        json!({
            "machine": self.machine.to_json(),
            "mode": self.mode,
            "elapsed_s": self.elapsed.as_secs_f64(),
            "sections": sections,
        })
    }

    /// Writes the JSON to `json` and the Markdown into `markdown`: between
    /// the marks if the file has them (the rest of the file is kept), or as
    /// a new file.
    pub fn write(&self, markdown: &Path, json: &Path) -> std::io::Result<()> {
        for path in [markdown, json] {
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir)?;
            }
        }
        let generated = format!("{BEGIN}\n{}{END}", self.markdown());
        let text = match std::fs::read_to_string(markdown) {
            Ok(old) => match (old.find(BEGIN), old.find(END)) {
                (Some(b), Some(e)) if b < e => {
                    format!("{}{generated}{}", &old[..b], &old[e + END.len()..])
                }
                _ => format!("{}\n{generated}\n", old.trim_end()),
            },
            Err(_) => format!("# Benchmark results\n\n{generated}\n"),
        };
        std::fs::write(markdown, text)?;
        let mut json_text = serde_json::to_string_pretty(&self.to_json())?;
        json_text.push('\n');
        std::fs::write(json, json_text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_are_grouped_by_thousands() {
        assert_eq!(group(1234567.0, 0), "1,234,567");
        assert_eq!(group(999.0, 0), "999");
        assert_eq!(group(1000.5, 2), "1,000.50");
        assert_eq!(group(-12345.0, 0), "-12,345");
        assert_eq!(group(0.836, 3), "0.836");
    }

    fn section() -> Section {
        let mut s = Section::new("x", "X", "setup".into(), &["path", "rate", "ratio"]);
        s.row("a", vec![Cell::int(1000.0), Cell::Ratio(0.5)]);
        s.row("b", vec![Cell::Empty, Cell::text("n/a")]);
        s
    }

    #[test]
    fn markdown_and_json_carry_every_cell() {
        let s = section();
        let md = s.markdown();
        assert!(md.contains("| a | 1,000 | **0.500** |"), "{md}");
        assert!(md.contains("| b | – | n/a |"), "{md}");
        let j = s.to_json();
        assert_eq!(j["rows"][0]["values"]["rate"], json!(1000.0));
        assert_eq!(j["rows"][1]["values"]["rate"], Value::Null);
    }

    #[test]
    fn writing_keeps_what_is_outside_the_marks() {
        let dir = tempfile::tempdir().unwrap();
        let md = dir.path().join("b.md");
        let js = dir.path().join("b.json");
        std::fs::write(&md, format!("intro\n{BEGIN}\nold\n{END}\noutro\n")).unwrap();
        let report = Report {
            machine: Machine::detect(),
            mode: "quick",
            sections: vec![section()],
            elapsed: Duration::from_secs(1),
        };
        report.write(&md, &js).unwrap();
        let text = std::fs::read_to_string(&md).unwrap();
        assert!(text.starts_with("intro\n"));
        assert!(text.ends_with("\noutro\n"));
        assert!(!text.contains("old"));
        assert!(text.contains("| a | 1,000 |"));
        let json: Value = serde_json::from_str(&std::fs::read_to_string(&js).unwrap()).unwrap();
        assert_eq!(json["mode"], "quick");
    }
}
