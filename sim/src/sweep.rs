//! Sweeps of one variable (RAM cap or flash bandwidth): a CSV and an SVG
//! plot of tok/s against it, with the flash-bandwidth bound drawn.

use plotters::prelude::*;
use sluice_core::{Error, Result};
use std::path::Path;

/// What a sweep varies.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Var {
    /// RAM cap, bytes.
    Ram,
    /// Flash read bandwidth, GB/s.
    Flash,
}

/// A parsed `--sweep ram=4G:48G[:N]` or `flash=1:20[:N]`.
#[derive(Clone, Debug, PartialEq)]
pub struct Sweep {
    /// The variable.
    pub var: Var,
    /// Points, ascending.
    pub points: Vec<f64>,
}

impl Sweep {
    /// Parses the flag's value; sizes take K/M/G/T suffixes.
    pub fn parse(s: &str) -> Result<Sweep> {
        let err = || {
            Error::Invalid(format!(
                "--sweep {s:?}: expected ram=LOW:HIGH[:POINTS] (e.g. ram=4G:48G) or flash=LOW:HIGH[:POINTS] in GB/s (e.g. flash=1:20)"
            ))
        };
        let (k, v) = s.split_once('=').ok_or_else(err)?;
        let parts: Vec<&str> = v.split(':').collect();
        if parts.len() < 2 || parts.len() > 3 {
            return Err(err());
        }
        let var = match k {
            "ram" => Var::Ram,
            "flash" => Var::Flash,
            _ => return Err(err()),
        };
        let num = |x: &str| -> Result<f64> {
            match var {
                Var::Ram => sluice_core::parse_size(x).map(|b| b as f64),
                Var::Flash => x.parse::<f64>().map_err(|_| err()),
            }
        };
        let (lo, hi) = (num(parts[0])?, num(parts[1])?);
        let n: usize = match parts.get(2) {
            Some(p) => p.parse().map_err(|_| err())?,
            None => 12,
        };
        let ok = lo > 0.0 && hi > lo && hi.is_finite() && (2..=200).contains(&n);
        if !ok {
            return Err(err());
        }
        let points = (0..n)
            .map(|i| lo + (hi - lo) * i as f64 / (n - 1) as f64)
            .collect();
        Ok(Sweep { var, points })
    }

    /// Axis label.
    pub fn label(&self) -> &'static str {
        match self.var {
            Var::Ram => "RAM cap (GB)",
            Var::Flash => "flash read bandwidth (GB/s)",
        }
    }

    /// A point as the x axis shows it.
    pub fn x(&self, p: f64) -> f64 {
        match self.var {
            Var::Ram => p / 1e9,
            Var::Flash => p,
        }
    }
}

/// One point's outcome.
#[derive(Clone, Debug)]
pub struct Point {
    /// The swept value as the x axis shows it.
    pub x: f64,
    /// Predicted decode tok/s (None: the cap is too small).
    pub tok_per_s: Option<f64>,
    /// Hit rate.
    pub hit_rate: Option<f64>,
    /// Bytes read per token.
    pub bytes_per_token: Option<f64>,
    /// The flash bound: tok/s if reads were the only cost.
    pub bound: Option<f64>,
}

/// Writes the CSV.
pub fn write_csv(path: &Path, sw: &Sweep, pts: &[Point]) -> Result<()> {
    let f = |v: Option<f64>| v.map_or(String::new(), |x| format!("{x:.6}"));
    let mut s = format!(
        "{},tok_per_s,hit_rate,bytes_read_per_token,flash_bound_tok_per_s\n",
        match sw.var {
            Var::Ram => "ram_cap_gb",
            Var::Flash => "flash_gbps",
        }
    );
    for p in pts {
        s.push_str(&format!(
            "{:.4},{},{},{},{}\n",
            p.x,
            f(p.tok_per_s),
            f(p.hit_rate),
            f(p.bytes_per_token),
            f(p.bound)
        ));
    }
    std::fs::write(path, s).map_err(|e| Error::io(path, e))
}

/// Draws tok/s against the swept variable, with the flash bound.
pub fn write_svg(path: &Path, title: &str, sw: &Sweep, pts: &[Point]) -> Result<()> {
    let fail = |e: String| Error::Invalid(format!("{}: plotting failed: {e}", path.display()));
    let xs: Vec<f64> = pts.iter().map(|p| p.x).collect();
    let (x0, x1) = (xs[0], *xs.last().expect("two points"));
    let ymax = pts
        .iter()
        .flat_map(|p| [p.tok_per_s, p.bound])
        .flatten()
        .filter(|v| v.is_finite())
        .fold(0.0f64, f64::max);
    // The bound can dwarf the prediction; keep the prediction readable.
    let pred_max = pts
        .iter()
        .filter_map(|p| p.tok_per_s)
        .fold(0.0f64, f64::max);
    let ytop = ymax.min(pred_max * 3.0).max(pred_max * 1.1).max(1e-3);
    let root = SVGBackend::new(path, (900, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| fail(e.to_string()))?;
    let mut ch = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 18))
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(60)
        .build_cartesian_2d(x0..x1, 0.0..ytop)
        .map_err(|e| fail(e.to_string()))?;
    ch.configure_mesh()
        .x_desc(sw.label())
        .y_desc("decode tok/s")
        .draw()
        .map_err(|e| fail(e.to_string()))?;
    let line = |get: fn(&Point) -> Option<f64>| -> Vec<(f64, f64)> {
        pts.iter()
            .filter_map(|p| get(p).map(|y| (p.x, y.min(ytop))))
            .collect()
    };
    ch.draw_series(LineSeries::new(line(|p| p.tok_per_s), BLUE.stroke_width(2)))
        .map_err(|e| fail(e.to_string()))?
        .label("predicted tok/s")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE));
    ch.draw_series(LineSeries::new(line(|p| p.bound), RED.stroke_width(1)))
        .map_err(|e| fail(e.to_string()))?
        .label("flash bound (reads only)")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED));
    ch.configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE.mix(0.8))
        .draw()
        .map_err(|e| fail(e.to_string()))?;
    root.present().map_err(|e| fail(e.to_string()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sweeps_parse() {
        let s = Sweep::parse("ram=4G:48G").unwrap();
        assert_eq!(s.var, Var::Ram);
        assert_eq!(s.points.len(), 12);
        assert_eq!(s.points[0], 4.0 * (1u64 << 30) as f64);
        let f = Sweep::parse("flash=1:20:20").unwrap();
        assert_eq!(f.points.len(), 20);
        assert_eq!(f.points[19], 20.0);
        for bad in ["ram=4G", "flash=20:1", "disk=1:2", "flash=1:2:1", "ram=x:y"] {
            assert!(Sweep::parse(bad).is_err(), "{bad}");
        }
    }
}
