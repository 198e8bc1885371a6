//! `report.html`: one self-contained page (inline CSS, plots as inline SVG drawn with
//! `plotters`, no script, nothing fetched), readable offline and printable.

use std::fmt::Write as _;

use plotters::coord::Shift;
use plotters::coord::types::RangedCoordf64;
use plotters::prelude::*;

use crate::multiclass::MulticlassMetrics;
use crate::report::{Curves, Metric, Metrics, OperatingPoint, Report};

/// HTML-escapes text (element content and attribute values). Control characters and the
/// invisible ones that reorder or hide text ([`is_invisible_format`]) become U+FFFD.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c if c.is_control() && c != '\n' && c != '\t' => out.push('\u{FFFD}'),
            c if is_invisible_format(c) => out.push('\u{FFFD}'),
            c => out.push(c),
        }
    }
    out
}

/// Text drawn in a plot (SVG text, escaped by plotters for markup only): control and
/// invisible format characters become U+FFFD.
fn visible(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_control() || is_invisible_format(c) {
                '\u{FFFD}'
            } else {
                c
            }
        })
        .collect()
}

/// The format characters that are invisible and change how the text around them reads:
/// bidirectional marks, embeddings, overrides and isolates, zero-width characters, the word
/// joiner and invisible operators, the byte order mark, interlinear annotation controls. A
/// right-to-left override in a subgroup's value turned its `(n 60)` into `(06 n)` in the
/// forest plot (a red-team finding).
fn is_invisible_format(c: char) -> bool {
    matches!(c,
        '\u{00AD}' | '\u{061C}' | '\u{180E}' | '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}'
        | '\u{2060}'..='\u{2064}' | '\u{2066}'..='\u{206F}' | '\u{FEFF}' | '\u{FFF9}'..='\u{FFFB}')
}

fn num(v: Option<f64>) -> String {
    match v {
        Some(v) if v.is_finite() => format!("{v:.4}"),
        Some(v) => format!("{v}"),
        None => "—".to_owned(),
    }
}

fn metric_cell(m: &Metric) -> String {
    match (m.value, m.ci_lower, m.ci_upper) {
        (Some(v), Some(lo), Some(hi)) => format!("{v:.4} ({lo:.4}–{hi:.4})"),
        (Some(v), _, _) => match &m.ci_undefined {
            Some(why) => format!("{v:.4} (interval not defined: {})", escape(why)),
            None => format!("{v:.4}"),
        },
        (None, _, _) => format!(
            "not defined: {}",
            escape(m.undefined.as_deref().unwrap_or("—"))
        ),
    }
}

type Area<'a> = DrawingArea<SVGBackend<'a>, Shift>;

/// Draws into an SVG string; a plotting error becomes a note in the page, not a failure.
fn svg(w: u32, h: u32, draw: impl FnOnce(&Area<'_>) -> Result<(), String>) -> String {
    let mut buf = String::new();
    let result = {
        let root = SVGBackend::with_string(&mut buf, (w, h)).into_drawing_area();
        root.fill(&WHITE)
            .map_err(|e| e.to_string())
            .and_then(|()| draw(&root))
            .and_then(|()| root.present().map_err(|e| e.to_string()))
    };
    match result {
        Ok(()) => buf,
        Err(e) => format!("<p class=\"note\">plot not drawn: {}</p>", escape(&e)),
    }
}

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

const FONT: (&str, u32) = ("sans-serif", 14);

type Chart<'a, 'b> = ChartContext<'a, SVGBackend<'b>, Cartesian2d<RangedCoordf64, RangedCoordf64>>;

/// A chart over `x` × `y` with a caption, axis descriptions and a light mesh.
fn new_chart<'a, 'b>(
    root: &'a Area<'b>,
    caption: Option<&str>,
    (x, y): (std::ops::Range<f64>, std::ops::Range<f64>),
    (x_desc, y_desc): (&str, &str),
) -> Result<Chart<'a, 'b>, String> {
    let mut builder = ChartBuilder::on(root);
    if let Some(c) = caption {
        builder.caption(c, ("sans-serif", 18));
    }
    let mut chart = builder
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(x, y)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc(x_desc)
        .y_desc(y_desc)
        .label_style(FONT)
        .draw()
        .map_err(err)?;
    Ok(chart)
}

/// A polyline, with a legend entry when it has a label.
fn line(
    chart: &mut Chart<'_, '_>,
    points: impl IntoIterator<Item = (f64, f64)>,
    style: ShapeStyle,
    label: Option<String>,
) -> Result<(), String> {
    let series = chart
        .draw_series(LineSeries::new(points, style))
        .map_err(err)?;
    if let Some(l) = label {
        series
            .label(l)
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 18, y)], style));
    }
    Ok(())
}

fn legend<'a, 'b: 'a>(chart: &mut Chart<'a, 'b>, at: SeriesLabelPosition) -> Result<(), String> {
    chart
        .configure_series_labels()
        .position(at)
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK.mix(0.4))
        .label_font(FONT)
        .draw()
        .map_err(err)
}

fn roc_plot(m: &Metrics, c: &Curves) -> String {
    svg(460, 420, |root| {
        let mut chart = new_chart(
            root,
            Some("ROC curve"),
            (0.0..1.0, 0.0..1.0),
            ("1 − specificity", "sensitivity"),
        )?;
        if !c.roc_band.is_empty() {
            let mut pts: Vec<(f64, f64)> =
                c.roc_band.iter().map(|b| (b.fpr, b.tpr_upper)).collect();
            pts.extend(c.roc_band.iter().rev().map(|b| (b.fpr, b.tpr_lower)));
            chart
                .draw_series(std::iter::once(Polygon::new(pts, BLUE.mix(0.18))))
                .map_err(err)?
                .label("bootstrap 95% band")
                .legend(|(x, y)| {
                    Rectangle::new([(x, y - 5), (x + 18, y + 5)], BLUE.mix(0.18).filled())
                });
        }
        line(
            &mut chart,
            [(0.0, 0.0), (1.0, 1.0)],
            BLACK.mix(0.3).into(),
            None,
        )?;
        line(
            &mut chart,
            c.roc.iter().map(|p| (p.fpr, p.tpr)),
            BLUE.stroke_width(2),
            Some(format!("model (AUROC {})", num(m.auroc.value))),
        )?;
        for op in m.operating_points.iter().filter(|o| o.source == "bundle") {
            if let (Some(se), Some(sp)) = (op.sensitivity.value, op.specificity.value) {
                chart
                    .draw_series(std::iter::once(Circle::new(
                        (1.0 - sp, se),
                        5,
                        RED.filled(),
                    )))
                    .map_err(err)?;
            }
        }
        legend(&mut chart, SeriesLabelPosition::LowerRight)
    })
}

fn pr_plot(m: &Metrics, c: &Curves) -> String {
    let prevalence = m.prevalence.value.unwrap_or(0.0);
    svg(460, 420, |root| {
        let mut chart = new_chart(
            root,
            Some("Precision–recall"),
            (0.0..1.0, 0.0..1.0),
            ("recall (sensitivity)", "precision (PPV)"),
        )?;
        line(
            &mut chart,
            [(0.0, prevalence), (1.0, prevalence)],
            BLACK.mix(0.3).into(),
            Some(format!("prevalence {prevalence:.3}")),
        )?;
        line(
            &mut chart,
            c.precision_recall.iter().map(|p| (p.recall, p.precision)),
            GREEN.stroke_width(2),
            Some(format!("model (AP {})", num(m.auprc.value))),
        )?;
        legend(&mut chart, SeriesLabelPosition::LowerLeft)
    })
}

fn calibration_plot(c: &Curves) -> String {
    let Some(rel) = &c.reliability else {
        return String::new();
    };
    svg(460, 520, |root| {
        let (upper, lower) = root.split_vertically(380);
        let mut chart = new_chart(
            &upper,
            Some("Calibration"),
            (0.0..1.0, 0.0..1.0),
            ("", "observed fraction positive"),
        )?;
        line(
            &mut chart,
            [(0.0, 0.0), (1.0, 1.0)],
            BLACK.mix(0.3).into(),
            None,
        )?;
        let pts: Vec<(f64, f64)> = rel
            .bins
            .iter()
            .filter_map(|b| Some((b.mean_predicted?, b.observed?)))
            .collect();
        line(&mut chart, pts.iter().copied(), RED.stroke_width(2), None)?;
        chart
            .draw_series(pts.iter().map(|&p| Circle::new(p, 4, RED.filled())))
            .map_err(err)?;
        let max_n = rel.bins.iter().map(|b| b.n).max().unwrap_or(1).max(1) as f64;
        let mut hist = new_chart(
            &lower,
            None,
            (0.0..1.0, 0.0..max_n * 1.05),
            ("predicted probability", "rows"),
        )?;
        hist.draw_series(rel.bins.iter().map(|b| {
            Rectangle::new(
                [(b.lower, 0.0), (b.upper, b.n as f64)],
                BLUE.mix(0.4).filled(),
            )
        }))
        .map_err(err)?;
        Ok(())
    })
}

fn decision_plot(m: &Metrics, c: &Curves) -> String {
    let d = &c.decision;
    if d.is_empty() {
        return String::new();
    }
    let prevalence = m.prevalence.value.unwrap_or(0.0);
    let y_max = prevalence.max(0.01) * 1.1;
    let y_min = -y_max * 0.25;
    let clamp = |v: f64| v.clamp(y_min, y_max);
    svg(460, 420, |root| {
        let mut chart = new_chart(
            root,
            Some("Decision curve"),
            (0.0..1.0, y_min..y_max),
            ("threshold probability", "net benefit"),
        )?;
        line(
            &mut chart,
            [(0.0, 0.0), (1.0, 0.0)],
            BLACK.into(),
            Some("treat none".to_owned()),
        )?;
        line(
            &mut chart,
            d.iter().map(|p| (p.threshold, clamp(p.treat_all))),
            MAGENTA.into(),
            Some("treat all".to_owned()),
        )?;
        line(
            &mut chart,
            d.iter().map(|p| (p.threshold, clamp(p.net_benefit))),
            BLUE.stroke_width(2),
            Some("model".to_owned()),
        )?;
        legend(&mut chart, SeriesLabelPosition::UpperRight)
    })
}

fn forest_plot(r: &Report) -> String {
    let rows: Vec<(String, f64, f64, f64)> = r
        .subgroups
        .iter()
        .filter_map(|s| {
            let m = match (&s.metrics, &s.multiclass) {
                (Some(m), _) => &m.auroc,
                (None, Some(m)) => &m.auroc,
                (None, None) => return None,
            };
            Some((
                visible(&format!("{} = {} (n {})", s.column, s.label(), s.n)),
                m.value?,
                m.ci_lower?,
                m.ci_upper?,
            ))
        })
        .collect();
    if rows.is_empty() {
        return String::new();
    }
    let lo = rows.iter().map(|r| r.2).fold(1.0, f64::min).min(0.5);
    let h = 90 + 28 * rows.len() as u32;
    let overall = r
        .metrics
        .as_ref()
        .map(|m| &m.auroc)
        .or(r.multiclass.as_ref().map(|m| &m.auroc))
        .and_then(|m| m.value);
    svg(620, h, |root| {
        let n = rows.len();
        let mut chart = ChartBuilder::on(root)
            .caption("AUROC by subgroup (95% CI)", ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(220)
            .build_cartesian_2d(lo..1f64, (0..n).into_segmented())
            .map_err(err)?;
        chart
            .configure_mesh()
            .disable_y_mesh()
            .y_labels(n)
            .y_label_formatter(&|v| match v {
                SegmentValue::CenterOf(i) | SegmentValue::Exact(i) => {
                    rows.get(*i).map(|r| r.0.clone()).unwrap_or_default()
                }
                SegmentValue::Last => String::new(),
            })
            .x_desc("AUROC")
            .label_style(FONT)
            .draw()
            .map_err(err)?;
        if let Some(o) = overall {
            chart
                .draw_series(std::iter::once(PathElement::new(
                    [(o, SegmentValue::Exact(0)), (o, SegmentValue::Last)],
                    BLACK.mix(0.4),
                )))
                .map_err(err)?;
        }
        for (i, row) in rows.iter().enumerate() {
            let y = SegmentValue::CenterOf(i);
            chart
                .draw_series(std::iter::once(PathElement::new(
                    [(row.2, y.clone()), (row.3, y.clone())],
                    BLUE.stroke_width(2),
                )))
                .map_err(err)?;
            chart
                .draw_series(std::iter::once(Circle::new((row.1, y), 5, BLUE.filled())))
                .map_err(err)?;
        }
        Ok(())
    })
}

fn op_rows(out: &mut String, ops: &[OperatingPoint]) {
    for op in ops {
        let c = &op.confusion;
        let _ = write!(
            out,
            "<tr><td>{}</td><td>{}</td><td>{:.6}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{} / {} / {} / {}</td></tr>",
            escape(&op.name),
            escape(op.source),
            op.threshold,
            metric_cell(&op.sensitivity),
            metric_cell(&op.specificity),
            metric_cell(&op.ppv),
            metric_cell(&op.npv),
            metric_cell(&op.f1),
            c.tp,
            c.fp,
            c.tn,
            c.fn_
        );
    }
}

/// The whole page.
pub fn render(r: &Report) -> String {
    let mut h = String::with_capacity(256 * 1024);
    let title = match &r.model {
        Some(m) => format!("Validation of {} version {}", m.name, m.version),
        None => "Validation of predictions".to_owned(),
    };
    let _ = write!(
        h,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{t}</title><style>\
         body{{font-family:sans-serif;margin:2em auto;max-width:1000px;color:#222;line-height:1.4}}\
         table{{border-collapse:collapse;margin:1em 0}}td,th{{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}}\
         th{{background:#f3f3f3}}.pass{{color:#070;font-weight:bold}}.fail{{color:#b00;font-weight:bold}}\
         .plots{{display:flex;flex-wrap:wrap;gap:12px}}.note{{color:#666;font-size:90%}}code{{font-size:90%}}\
         </style></head><body><h1>{t}</h1>",
        t = escape(&title)
    );
    let _ = write!(
        h,
        "<p class=\"note\">Made by Nightingale {} on {} ({}). Not a clinical approval: a \
         summary of how this model performed on this dataset.</p>",
        escape(&r.nightingale_version),
        escape(&r.created),
        escape(r.source)
    );
    if let Some(g) = &r.gate {
        let _ = write!(
            h,
            "<h2>Deployment gate: <span class=\"{}\">{}</span></h2><table><tr><th>criterion</th>\
             <th>observed</th><th>min</th><th>max</th><th>result</th></tr>",
            if g.passed { "pass" } else { "fail" },
            if g.passed { "PASSED" } else { "FAILED" }
        );
        for c in &g.criteria {
            // the minimum-sample rule's numbers are row counts
            let shown = |v: Option<f64>| match (c.metric.as_str(), v) {
                ("positives" | "negatives", Some(v)) => format!("{v:.0}"),
                _ => num(v),
            };
            let _ = write!(
                h,
                "<tr><td><code>{}</code></td><td>{}</td><td>{}</td><td>{}</td><td class=\"{}\">{}</td></tr>",
                escape(&c.criterion),
                shown(c.observed),
                shown(c.min),
                num(c.max),
                if c.passed { "pass" } else { "fail" },
                escape(c.reason.as_deref().unwrap_or("pass"))
            );
        }
        h.push_str("</table>");
    }
    h.push_str("<h2>Model and data</h2><table>");
    let mut kv = |k: &str, v: String| {
        let _ = write!(h, "<tr><th>{}</th><td>{}</td></tr>", escape(k), v);
    };
    if let Some(m) = &r.model {
        kv(
            "model",
            escape(&format!("{} version {}", m.name, m.version)),
        );
        kv(
            "manifest SHA-256",
            format!("<code>{}</code>", escape(&m.manifest_sha256)),
        );
        kv(
            "model SHA-256",
            format!("<code>{}</code>", escape(&m.model_sha256)),
        );
        kv(
            "signature key id",
            escape(m.signature_key_id.as_deref().unwrap_or("unsigned")),
        );
        kv("engine", escape(m.backend.as_deref().unwrap_or("—")));
        kv(
            "scored",
            escape(&format!("{} = {}", m.output, m.positive_label)),
        );
    }
    let d = &r.dataset;
    kv("dataset", escape(&d.summary.path));
    kv(
        "dataset SHA-256",
        format!("<code>{}</code>", escape(&d.summary.sha256)),
    );
    kv(
        "rows",
        escape(&format!(
            "{} read, {} used, {} unusable",
            d.summary.rows_read, d.rows_used, d.rows_unusable
        )),
    );
    if let Some(m) = &r.metrics {
        kv(
            "outcome",
            escape(&format!(
                "{} positives, {} negatives; prevalence {}",
                m.positives,
                m.negatives,
                metric_cell(&m.prevalence)
            )),
        );
    }
    if let Some(mc) = &r.multiclass {
        kv("classes", escape(&mc.labels.join(", ")));
    }
    h.push_str("</table>");
    if let (Some(m), Some(c)) = (&r.metrics, &r.curves) {
        binary_sections(&mut h, m, c);
    }
    if let Some(mc) = &r.multiclass {
        multiclass_sections(&mut h, mc);
    }
    rest(&mut h, r);
    h
}

/// Rows of a metric table: name, value with its interval, how the interval was made.
fn metric_rows(h: &mut String, rows: &[(&str, &Metric)]) {
    for (name, metric) in rows {
        let _ = write!(
            h,
            "<tr><td>{}</td><td>{}</td><td>{}</td></tr>",
            name,
            metric_cell(metric),
            metric.ci_method.unwrap_or("—")
        );
    }
}

fn multiclass_sections(h: &mut String, mc: &MulticlassMetrics) {
    h.push_str("<h2>Discrimination (one-vs-rest) and accuracy</h2><table><tr><th>metric</th><th>value (95% CI)</th><th>interval</th></tr>");
    metric_rows(
        h,
        &[
            ("macro AUROC (one-vs-rest)", &mc.auroc),
            ("macro average precision", &mc.auprc),
            ("accuracy (top-1)", &mc.accuracy),
            ("macro sensitivity (recall)", &mc.macro_sensitivity),
            ("macro F1", &mc.macro_f1),
            ("Brier score (multi-class)", &mc.brier),
        ],
    );
    h.push_str("</table><h2>Classes</h2><table><tr><th>class</th><th>n</th><th>AUROC (95% CI)</th><th>AP</th><th>sensitivity</th><th>PPV</th><th>F1</th></tr>");
    for c in &mc.classes {
        let _ = write!(
            h,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            escape(&c.label),
            c.n,
            metric_cell(&c.auroc),
            metric_cell(&c.auprc),
            metric_cell(&c.sensitivity),
            metric_cell(&c.ppv),
            metric_cell(&c.f1)
        );
    }
    h.push_str("</table><h2>Confusion matrix</h2><p class=\"note\">Rows: true class; columns: predicted class (argmax).</p><table><tr><th></th>");
    for l in &mc.labels {
        let _ = write!(h, "<th>{}</th>", escape(l));
    }
    h.push_str("</tr>");
    for (t, row) in mc.confusion.iter().enumerate() {
        let _ = write!(h, "<tr><th>{}</th>", escape(&mc.labels[t]));
        for v in row {
            let _ = write!(h, "<td>{v}</td>");
        }
        h.push_str("</tr>");
    }
    h.push_str("</table>");
}

fn binary_sections(h: &mut String, m: &Metrics, c: &Curves) {
    h.push_str("<h2>Discrimination and calibration</h2><table><tr><th>metric</th><th>value (95% CI)</th><th>interval</th></tr>");
    metric_rows(
        h,
        &[
            ("AUROC", &m.auroc),
            ("AUPRC (average precision)", &m.auprc),
            ("Brier score", &m.brier),
            (
                "calibration intercept (in the large)",
                &m.calibration_intercept,
            ),
            ("calibration slope", &m.calibration_slope),
            ("expected calibration error", &m.ece),
            ("maximum calibration error", &m.mce),
        ],
    );
    if let Some(b) = m.auroc.bootstrap {
        let _ = write!(
            h,
            "<tr><td>AUROC, bootstrap</td><td>({:.4}–{:.4})</td><td>percentile, {} replicates</td></tr>",
            b.ci_lower, b.ci_upper, b.replicates
        );
    }
    h.push_str("</table>");

    h.push_str("<h2>Operating points</h2><table><tr><th>name</th><th>source</th><th>threshold</th><th>sensitivity</th><th>specificity</th><th>PPV</th><th>NPV</th><th>F1</th><th>TP / FP / TN / FN</th></tr>");
    op_rows(h, &m.operating_points);
    h.push_str(
        "</table><p class=\"note\"><code>bundle</code> thresholds are declared in bundle.toml; \
        target thresholds are chosen on this dataset and are optimistic.</p>",
    );

    h.push_str("<h2>Plots</h2><div class=\"plots\">");
    h.push_str(&roc_plot(m, c));
    h.push_str(&pr_plot(m, c));
    h.push_str(&calibration_plot(c));
    h.push_str(&decision_plot(m, c));
    h.push_str("</div>");
}

fn rest(h: &mut String, r: &Report) {
    if !r.subgroups.is_empty() {
        h.push_str("<h2>Subgroups</h2>");
        h.push_str(&forest_plot(r));
        h.push_str("<table><tr><th>subgroup</th><th>n</th><th>positives</th><th>AUROC (95% CI)</th><th>Brier</th><th>status</th></tr>");
        for s in &r.subgroups {
            let (auc, brier) = match (&s.metrics, &s.multiclass) {
                (Some(m), _) => (metric_cell(&m.auroc), metric_cell(&m.brier)),
                (None, Some(m)) => (metric_cell(&m.auroc), metric_cell(&m.brier)),
                (None, None) => ("—".to_owned(), "—".to_owned()),
            };
            let _ = write!(
                h,
                "<tr><td>{} = {}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                escape(&s.column),
                escape(&s.label()),
                s.n,
                // A multi-class output has no positive class (a review's finding: a column
                // of zeros).
                if r.multiclass.is_some() {
                    "—".to_owned()
                } else {
                    s.positives.to_string()
                },
                auc,
                brier,
                escape(s.reason.as_deref().unwrap_or(s.status))
            );
        }
        h.push_str("</table>");
    }
    let d = &r.dataset;
    if let Some(c) = &r.comparison
        && let Some(d) = &c.auroc_difference
    {
        let _ = write!(
            h,
            "<h2>Comparison</h2><p>AUROC {} {:.4} vs {} {:.4}: difference {:+.4} (95% CI {:+.4} to {:+.4}), DeLong z = {:.3}, p = {:.4}, n = {}.</p>",
            escape(&c.a),
            d.auc_a,
            escape(&c.b),
            d.auc_b,
            d.difference,
            d.ci_lower,
            d.ci_upper,
            d.z,
            d.p_value,
            c.n
        );
    }
    if d.rows_unusable > 0 {
        let _ = write!(
            h,
            "<h2>Unusable rows ({})</h2><table><tr><th>row</th><th>reason</th></tr>",
            d.rows_unusable
        );
        for u in &d.unusable {
            let _ = write!(
                h,
                "<tr><td>{}</td><td>{}</td></tr>",
                u.row,
                escape(&u.reason)
            );
        }
        h.push_str("</table>");
        if d.unusable_truncated {
            h.push_str("<p class=\"note\">Only the first 1,000 are listed.</p>");
        }
    }
    h.push_str("<h2>TRIPOD+AI items filled by this report</h2><table>");
    for (k, v) in &r.tripod_ai {
        let _ = write!(h, "<tr><th>{}</th><td>{}</td></tr>", escape(k), escape(v));
    }
    let _ = writeln!(
        h,
        "</table><p class=\"note\">Settings: confidence {}, {} bootstrap replicates (seed {}), \
         {} calibration bins, subgroups need ≥ {} rows.</p></body></html>",
        r.settings.confidence,
        r.settings.bootstrap_replicates,
        r.settings.seed,
        r.settings.calibration_bins,
        r.settings.min_subgroup_n
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Red-team finding: a right-to-left override in a subgroup's value reordered the text
    /// after it in the table and the forest plot. Invisible format characters become U+FFFD;
    /// letters of any script, combining accents included, stay.
    #[test]
    fn invisible_format_characters_are_shown_not_obeyed() {
        for sneaky in [
            "north\u{202e}",
            "a\u{200b}b",
            "\u{2066}x\u{2069}",
            "\u{feff}y",
        ] {
            for out in [escape(sneaky), visible(sneaky)] {
                assert!(out.contains('\u{FFFD}'), "{out:?}");
                assert!(!out.chars().any(is_invisible_format), "{out:?}");
            }
        }
        assert_eq!(escape("Jose\u{301} 鈴木 <b>"), "Jose\u{301} 鈴木 &lt;b&gt;");
        assert_eq!(visible("Jose\u{301} (n 60)"), "Jose\u{301} (n 60)");
    }
}
