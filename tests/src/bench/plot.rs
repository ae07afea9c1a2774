//! The ExCache plot: slowdown against all-local memory as the cache shrinks, one line per
//! workload, on a log scale (slowdowns span 1x to ~100x and the targets sit at 1.5x and 2x), as SVG (plotters' SVG backend needs no fonts or native libraries).

use std::path::Path;

use anyhow::{anyhow, Result};
use plotters::prelude::*;

/// One workload's points: (ExCache size as % of the working set, slowdown vs all-local).
pub type Curve = (String, Vec<(f64, f64)>);

const COLORS: [RGBColor; 4] = [BLUE, RED, GREEN, MAGENTA];

pub fn slowdown_svg(path: &Path, curves: &[Curve], title: &str) -> Result<()> {
    let err = |e: &dyn std::fmt::Display| anyhow!("plot {}: {e}", path.display());
    let ymax = curves
        .iter()
        .flat_map(|(_, pts)| pts.iter().map(|p| p.1))
        .fold(2.0f64, f64::max)
        * 1.1;
    let ymin = curves
        .iter()
        .flat_map(|(_, pts)| pts.iter().map(|p| p.1))
        .fold(0.5f64, f64::min)
        * 0.9;
    let root = SVGBackend::new(path, (900, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 18))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..105f64, (ymin..ymax).log_scale())
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_desc("ExCache size, % of the working set")
        .y_desc("pass+verify time / all-local (median, log scale)")
        .draw()
        .map_err(|e| err(&e))?;
    chart
        .draw_series(LineSeries::new([(0.0, 1.0), (105.0, 1.0)], BLACK))
        .map_err(|e| err(&e))?
        .label("all-local = 1")
        .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], BLACK));
    for (i, (name, pts)) in curves.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        chart
            .draw_series(LineSeries::new(pts.iter().copied(), color.stroke_width(2)))
            .map_err(|e| err(&e))?
            .label(name.as_str())
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], color));
        chart
            .draw_series(pts.iter().map(|&p| Circle::new(p, 4, color.filled())))
            .map_err(|e| err(&e))?;
    }
    // The targets: zipf at 50% <= 1.5x, seq at 25% <= 2x (>= 50% of all-local speed).
    chart
        .draw_series([(50.0, 1.5), (25.0, 2.0)].map(|p| Cross::new(p, 7, BLACK.stroke_width(2))))
        .map_err(|e| err(&e))?
        .label("targets: zipf@50% <= 1.5x, seq@25% <= 2x")
        .legend(|(x, y)| Cross::new((x + 10, y), 5, BLACK.stroke_width(2)));
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_an_svg() {
        let p = std::env::temp_dir().join(format!("vnode-bench-plot-{}.svg", std::process::id()));
        let curves = vec![(
            "seq".to_string(),
            vec![(12.5, 3.0), (25.0, 2.0), (100.0, 1.1)],
        )];
        slowdown_svg(&p, &curves, "test").unwrap();
        let s = std::fs::read_to_string(&p).unwrap();
        assert!(s.starts_with("<svg") && s.contains("seq"));
        std::fs::remove_file(&p).unwrap();
    }
}
