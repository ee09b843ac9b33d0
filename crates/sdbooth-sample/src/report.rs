//! The run report: one self-contained HTML file (inline SVG curves, inline base64 PNG
//! thumbnails, no scripts, no network) that shows a training run at a glance: config, dataset
//! and buckets, loss / validation loss / learning rate / step time / memory curves, sample
//! images per step, per-image validation losses and where the checkpoints are.
//!
//! The trainer fills a [`RunReport`]; this module knows nothing about training.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// One optimizer step as the JSONL log records it.
#[derive(Debug, Clone, PartialEq)]
pub struct StepPoint {
    pub step: u64,
    pub epoch: u64,
    pub loss: f64,
    pub avr_loss: f64,
    pub lr_unet: f64,
    pub lr_text_encoder: Option<f64>,
    pub step_seconds: f64,
    pub peak_rss_bytes: Option<u64>,
}

/// One bucket of one dataset.
#[derive(Debug, Clone, PartialEq)]
pub struct BucketRow {
    pub dataset: usize,
    pub index: usize,
    pub width: u32,
    pub height: u32,
    /// Images including repeats.
    pub count: usize,
}

/// A held-out image's validation loss: at the first and the last evaluation.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageLoss {
    pub path: String,
    pub caption: String,
    pub first: f64,
    pub last: f64,
}

/// The sample images of one sampling point (a step or an epoch end).
#[derive(Debug, Clone, PartialEq)]
pub struct SampleGroup {
    /// "step 20", "epoch 2", ...
    pub label: String,
    /// (prompt, PNG file).
    pub images: Vec<(String, PathBuf)>,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct RunReport {
    pub title: String,
    /// (what, value) lines shown first: steps, epochs, final model, mean step time, ...
    pub summary: Vec<(String, String)>,
    /// Flags as (name, value), only those set.
    pub config: Vec<(String, String)>,
    /// The dry run's text report of the dataset.
    pub dataset_text: String,
    pub buckets: Vec<BucketRow>,
    pub steps: Vec<StepPoint>,
    /// (step, mean validation loss).
    pub validation: Vec<(u64, f64)>,
    pub per_image: Vec<ImageLoss>,
    pub samples: Vec<SampleGroup>,
    /// Model files and state folders (path, size in bytes; None for folders).
    pub checkpoints: Vec<(PathBuf, Option<u64>)>,
}

/// Longest side of a sample thumbnail in the report.
pub const THUMBNAIL_SIZE: u32 = 256;

/// Writes the report atomically.
pub fn write_report(path: &Path, report: &RunReport) -> std::io::Result<()> {
    let html = render_html(report);
    sdbooth_checkpoint::atomic_write_bytes(path, html.as_bytes())
}

pub fn render_html(r: &RunReport) -> String {
    let mut h = String::with_capacity(1 << 16);
    let title = esc(&r.title);
    let _ = write!(
        h,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{title}</title>\n<style>{CSS}</style></head>\n<body>\n<h1>{title}</h1>\n"
    );
    h.push_str("<table class=\"kv\">");
    for (k, v) in &r.summary {
        let _ = write!(h, "<tr><th>{}</th><td>{}</td></tr>", esc(k), esc(v));
    }
    h.push_str("</table>\n");

    h.push_str("<h2>Curves</h2>\n<div class=\"charts\">\n");
    let loss: Vec<(f64, f64)> = r.steps.iter().map(|s| (s.step as f64, s.loss)).collect();
    let avr: Vec<(f64, f64)> = r.steps.iter().map(|s| (s.step as f64, s.avr_loss)).collect();
    let val: Vec<(f64, f64)> = r.validation.iter().map(|&(s, l)| (s as f64, l)).collect();
    let mut series = vec![
        Series { name: "loss", color: "#9ab8e0", points: &loss, dots: false },
        Series { name: "average loss", color: "#1f5fbf", points: &avr, dots: false },
    ];
    if !val.is_empty() {
        series.push(Series { name: "validation loss", color: "#d0401b", points: &val, dots: true });
    }
    h.push_str(&line_chart("Loss", &series));
    let lr: Vec<(f64, f64)> = r.steps.iter().map(|s| (s.step as f64, s.lr_unet)).collect();
    let lr_te: Vec<(f64, f64)> =
        r.steps.iter().filter_map(|s| s.lr_text_encoder.map(|l| (s.step as f64, l))).collect();
    let mut lr_series = vec![Series { name: "lr U-Net", color: "#2b8a3e", points: &lr, dots: false }];
    if !lr_te.is_empty() {
        lr_series.push(Series { name: "lr text encoder", color: "#a05a00", points: &lr_te, dots: false });
    }
    h.push_str(&line_chart("Learning rate", &lr_series));
    let secs: Vec<(f64, f64)> = r.steps.iter().map(|s| (s.step as f64, s.step_seconds)).collect();
    h.push_str(&line_chart(
        "Step time (s)",
        &[Series { name: "seconds / step", color: "#6741d9", points: &secs, dots: false }],
    ));
    let mem: Vec<(f64, f64)> = r
        .steps
        .iter()
        .filter_map(|s| s.peak_rss_bytes.map(|b| (s.step as f64, b as f64 / (1u64 << 20) as f64)))
        .collect();
    h.push_str(&line_chart(
        "Peak memory (MiB, RSS)",
        &[Series { name: "peak RSS", color: "#c2255c", points: &mem, dots: false }],
    ));
    h.push_str("</div>\n");

    if !r.samples.is_empty() {
        h.push_str("<h2>Samples</h2>\n");
        for g in &r.samples {
            let _ = write!(h, "<h3>{}</h3>\n<div class=\"grid\">", esc(&g.label));
            for (prompt, path) in &g.images {
                let img = match thumbnail_png(path) {
                    // Small samples (tests, tiny models) are shown at least 128 px wide, pixelated.
                    Ok((bytes, w)) => format!(
                        "<img width=\"{}\" alt=\"{}\" src=\"data:image/png;base64,{}\">",
                        w.max(128),
                        esc(prompt),
                        base64(&bytes)
                    ),
                    Err(e) => format!("<div class=\"missing\">{}</div>", esc(&e)),
                };
                let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
                let _ = write!(
                    h,
                    "<figure>{img}<figcaption>{}<br><span class=\"file\">{}</span></figcaption></figure>",
                    esc(prompt),
                    esc(&name)
                );
            }
            h.push_str("</div>\n");
        }
    }

    if !r.per_image.is_empty() {
        h.push_str("<h2>Validation loss per held-out image</h2>\n<p>Highest last loss first: images far above the others are worth a look (wrong caption, bad crop, a different subject).</p>\n<table class=\"data\"><tr><th>image</th><th>caption</th><th>first</th><th>last</th><th>change</th></tr>");
        for p in &r.per_image {
            let _ = write!(
                h,
                "<tr><td>{}</td><td>{}</td><td>{:.5}</td><td>{:.5}</td><td>{:+.5}</td></tr>",
                esc(&p.path),
                esc(&p.caption),
                p.first,
                p.last,
                p.last - p.first
            );
        }
        h.push_str("</table>\n");
    }

    h.push_str("<h2>Checkpoints</h2>\n<table class=\"data\"><tr><th>path</th><th>size</th></tr>");
    for (p, size) in &r.checkpoints {
        let size =
            size.map_or("folder".to_string(), |b| format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64));
        let _ = write!(h, "<tr><td>{}</td><td>{size}</td></tr>", esc(&p.display().to_string()));
    }
    h.push_str("</table>\n");

    h.push_str("<h2>Dataset</h2>\n<table class=\"data\"><tr><th>dataset</th><th>bucket</th><th>resolution</th><th>images × repeats</th></tr>");
    for b in &r.buckets {
        let _ = write!(
            h,
            "<tr><td>{}</td><td>{}</td><td>{}×{}</td><td>{}</td></tr>",
            b.dataset, b.index, b.width, b.height, b.count
        );
    }
    let _ = write!(h, "</table>\n<pre>{}</pre>\n", esc(&r.dataset_text));

    h.push_str("<h2>Config</h2>\n<table class=\"kv\">");
    for (k, v) in &r.config {
        let _ = write!(h, "<tr><th>{}</th><td>{}</td></tr>", esc(k), esc(v));
    }
    h.push_str("</table>\n</body></html>\n");
    h
}

const CSS: &str = "body{font-family:system-ui,sans-serif;margin:24px;color:#222;max-width:1400px}\
h2{border-bottom:1px solid #ccc;padding-bottom:4px;margin-top:32px}\
table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ddd;padding:3px 8px;text-align:left;vertical-align:top}\
table.kv th{background:#f4f4f4;font-weight:600}table.data th{background:#eef2f8}\
.charts{display:flex;flex-wrap:wrap;gap:16px}.charts svg{border:1px solid #ddd;background:#fff}\
.grid{display:flex;flex-wrap:wrap;gap:12px}figure{margin:0;width:260px}figure img{max-width:256px;max-height:256px;image-rendering:pixelated;display:block}\
figcaption{font-size:12px;word-break:break-word}.file{color:#888;font-size:11px}.missing{color:#b00;font-size:12px}\
pre{background:#f7f7f7;padding:8px;font-size:12px;overflow-x:auto}";

struct Series<'a> {
    name: &'a str,
    color: &'a str,
    points: &'a [(f64, f64)],
    dots: bool,
}

/// An SVG line chart with axis ticks and a legend; non-finite points are skipped.
fn line_chart(title: &str, series: &[Series<'_>]) -> String {
    let (w, h) = (560.0, 260.0);
    let (left, right, top, bottom) = (64.0, 12.0, 28.0, 36.0);
    let finite = |p: &&(f64, f64)| p.0.is_finite() && p.1.is_finite();
    let all: Vec<(f64, f64)> = series.iter().flat_map(|s| s.points.iter().filter(finite).copied()).collect();
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" viewBox=\"0 0 {w} {h}\" font-family=\"sans-serif\" font-size=\"11\">\
<text x=\"{left}\" y=\"16\" font-size=\"13\" font-weight=\"bold\">{}</text>",
        esc(title)
    );
    if all.is_empty() {
        svg.push_str(&format!(
            "<text x=\"{}\" y=\"{}\" fill=\"#888\">no data</text></svg>\n",
            w / 2.0 - 24.0,
            h / 2.0
        ));
        return svg;
    }
    let (mut x0, mut x1) = min_max(all.iter().map(|p| p.0));
    let (mut y0, mut y1) = min_max(all.iter().map(|p| p.1));
    if x1 <= x0 {
        x0 -= 1.0;
        x1 += 1.0;
    }
    if y1 <= y0 {
        let pad = if y0 == 0.0 { 1.0 } else { y0.abs() * 0.1 };
        y0 -= pad;
        y1 += pad;
    }
    let (pw, ph) = (w - left - right, h - top - bottom);
    let sx = |x: f64| left + (x - x0) / (x1 - x0) * pw;
    let sy = |y: f64| top + ph - (y - y0) / (y1 - y0) * ph;
    let _ = write!(
        svg,
        "<rect x=\"{left}\" y=\"{top}\" width=\"{pw}\" height=\"{ph}\" fill=\"none\" stroke=\"#999\"/>"
    );
    for i in 0..=4 {
        let f = i as f64 / 4.0;
        let (yv, xv) = (y0 + f * (y1 - y0), x0 + f * (x1 - x0));
        let (py, px) = (sy(yv), sx(xv));
        let _ = write!(
            svg,
            "<line x1=\"{left}\" x2=\"{}\" y1=\"{py:.1}\" y2=\"{py:.1}\" stroke=\"#eee\"/>\
<text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>\
<text x=\"{px:.1}\" y=\"{}\" text-anchor=\"middle\">{}</text>",
            left + pw,
            left - 4.0,
            py + 4.0,
            tick(yv),
            top + ph + 14.0,
            if x1 - x0 >= 4.0 { format!("{xv:.0}") } else { tick(xv) }
        );
    }
    let _ =
        write!(svg, "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">step</text>", left + pw / 2.0, h - 6.0);
    for (k, s) in series.iter().enumerate() {
        let pts: Vec<String> =
            s.points.iter().filter(finite).map(|&(x, y)| format!("{:.1},{:.1}", sx(x), sy(y))).collect();
        if pts.len() > 1 {
            let _ = write!(
                svg,
                "<polyline fill=\"none\" stroke=\"{}\" stroke-width=\"1.5\" points=\"{}\"/>",
                s.color,
                pts.join(" ")
            );
        }
        if s.dots || pts.len() == 1 {
            for &(x, y) in s.points.iter().filter(finite) {
                let _ = write!(
                    svg,
                    "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3\" fill=\"{}\"/>",
                    sx(x),
                    sy(y),
                    s.color
                );
            }
        }
        let lx = left + 8.0 + 150.0 * k as f64;
        let _ = write!(
            svg,
            "<rect x=\"{lx}\" y=\"{}\" width=\"12\" height=\"3\" fill=\"{}\"/><text x=\"{}\" y=\"{}\">{}</text>",
            top + 8.0,
            s.color,
            lx + 16.0,
            top + 12.0,
            esc(s.name)
        );
    }
    svg.push_str("</svg>\n");
    svg
}

fn min_max(it: impl Iterator<Item = f64>) -> (f64, f64) {
    it.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| (a.min(v), b.max(v)))
}

fn tick(v: f64) -> String {
    let a = v.abs();
    if a != 0.0 && !(1e-2..1e5).contains(&a) {
        format!("{v:.2e}")
    } else if a >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.3}")
    }
}

/// A PNG of the image scaled down to [`THUMBNAIL_SIZE`] on its longest side (as is when smaller).
fn thumbnail_png(path: &Path) -> Result<(Vec<u8>, u32), String> {
    let img = image::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let img = if img.width().max(img.height()) > THUMBNAIL_SIZE {
        img.resize(THUMBNAIL_SIZE, THUMBNAIL_SIZE, image::imageops::FilterType::Triangle)
    } else {
        img
    };
    let mut out = std::io::Cursor::new(Vec::new());
    img.to_rgb8()
        .write_to(&mut out, image::ImageFormat::Png)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    Ok((out.into_inner(), img.width()))
}

fn esc(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&#39;"),
            c => o.push(c),
        }
    }
    o
}

/// Standard base64 with padding (RFC 4648), for data: URLs.
pub fn base64(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut o = String::with_capacity(data.len().div_ceil(3) * 4);
    for c in data.chunks(3) {
        let n = (c[0] as u32) << 16 | (*c.get(1).unwrap_or(&0) as u32) << 8 | *c.get(2).unwrap_or(&0) as u32;
        o.push(T[(n >> 18) as usize & 63] as char);
        o.push(T[(n >> 12) as usize & 63] as char);
        o.push(if c.len() > 1 { T[(n >> 6) as usize & 63] as char } else { '=' });
        o.push(if c.len() > 2 { T[n as usize & 63] as char } else { '=' });
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc4648_vectors() {
        let v = ["", "Zg==", "Zm8=", "Zm9v", "Zm9vYg==", "Zm9vYmE=", "Zm9vYmFy"];
        for (i, want) in v.iter().enumerate() {
            assert_eq!(base64(&b"foobar"[..i]), *want);
        }
    }

    #[test]
    fn renders_curves_and_escapes() {
        let r = RunReport {
            title: "run <1>".into(),
            steps: (1..=5)
                .map(|s| StepPoint {
                    step: s,
                    epoch: 1,
                    loss: 0.1 * s as f64,
                    avr_loss: 0.1,
                    lr_unet: 1e-4,
                    lr_text_encoder: None,
                    step_seconds: 0.5,
                    peak_rss_bytes: Some(1 << 30),
                })
                .collect(),
            validation: vec![(0, 0.2), (5, f64::NAN)],
            ..Default::default()
        };
        let h = render_html(&r);
        assert!(h.contains("run &lt;1&gt;"));
        assert!(h.contains("<polyline") && h.contains("validation loss"));
        assert!(!h.contains("http://") || h.matches("http://").count() == h.matches("xmlns=").count());
    }
}
