"""The HTML report's stylesheet: readable type, Okabe-Ito accents, a layout that reflows to ~320 px."""

CSS = """
:root{--ink:#1f2328;--muted:#59636e;--line:#d8dee4;--panel:#f6f8fa;--blue:#0072B2;--verm:#D55E00;
--green:#009E73;--warnbg:#fbeee6;--okbg:#e8f5f0}
*{box-sizing:border-box}
html{-webkit-text-size-adjust:100%}
body{margin:0;color:var(--ink);background:#fff;font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,
"Helvetica Neue",Arial,sans-serif}
main{max-width:1200px;margin:0 auto;padding:18px 20px 56px}
header h1{font-size:1.55rem;line-height:1.25;margin:.1em 0 .15em}
header .meta{color:var(--muted);font-size:.9rem;margin:0}
nav{display:flex;flex-wrap:wrap;gap:4px 14px;margin:10px 0 4px;font-size:.9rem}
nav a{color:var(--blue);text-decoration:none}nav a:hover{text-decoration:underline}
h2{font-size:1.2rem;margin:34px 0 10px;padding-bottom:4px;border-bottom:1px solid var(--line)}
h3{font-size:1rem;margin:0 0 6px}
section>h3{margin-top:18px}
.sr{position:absolute;width:1px;height:1px;overflow:hidden;clip:rect(0 0 0 0);white-space:nowrap}
p{margin:.4em 0}
.verdict{margin:16px 0 8px;padding:14px 18px;border-radius:8px;border-left:7px solid var(--verm);
background:var(--warnbg)}
.verdict.clean{border-left-color:var(--green);background:var(--okbg)}
.verdict .lead{font-size:1.18rem;font-weight:600;margin:0}
.verdict .lead+.lead{font-weight:500;font-size:1.05rem;margin-top:.35em}
.verdict .rec{margin:.6em 0 0;font-size:1rem}
.changes{margin:8px 0;padding:8px 14px;border-radius:6px;background:var(--panel);border:1px dashed var(--line)}
.facts{display:grid;grid-template-columns:repeat(auto-fit,minmax(min(100%,250px),1fr));gap:10px 18px;margin:0}
.facts div{background:var(--panel);border-radius:6px;padding:8px 12px;min-width:0}
.facts dt{font-size:.78rem;text-transform:uppercase;letter-spacing:.04em;color:var(--muted)}
.facts dd{margin:0;overflow-wrap:anywhere}
.table-wrap{overflow-x:auto;max-width:100%;margin:6px 0 10px}
table{border-collapse:collapse;font-size:.9rem;min-width:60%}
th,td{padding:5px 10px;border-bottom:1px solid var(--line);text-align:left;vertical-align:top;
overflow-wrap:break-word}
th{font-weight:600;background:var(--panel);white-space:nowrap}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
td.flag{color:var(--verm);font-weight:600}
.badge{display:inline-block;padding:0 7px;border-radius:9px;font-size:.78rem;border:1px solid var(--line);
background:#fff;white-space:nowrap}
.badge.calibrated{border-color:var(--green);color:#006548}
.badge.default{border-color:var(--muted);color:var(--muted)}
.badge.published{border-color:var(--ink);color:var(--ink)}
.badge.config{border-color:#9a6700;color:#7a5200}
.badge.memtrack{border-color:var(--muted);color:var(--muted);border-style:dashed}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(min(100%,380px),1fr));gap:16px}
.cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(min(100%,300px),1fr));gap:14px}
figure{margin:0;padding:10px 12px;border:1px solid var(--line);border-radius:8px;background:#fff;min-width:0}
figcaption{font-size:.86rem;color:var(--muted);margin-top:4px}
svg.chart{display:block;width:100%;height:auto}
figure.heat{overflow-x:auto}
.legend{display:flex;flex-wrap:wrap;gap:2px 14px;font-size:.85rem;color:var(--ink);margin:4px 0}
.legend span{display:inline-flex;align-items:center;gap:5px;overflow-wrap:anywhere}
svg.swatch{flex:none}
.imgs{display:grid;gap:6px;grid-template-columns:repeat(2,minmax(0,1fr))}
.imgs.three{grid-template-columns:repeat(3,minmax(0,1fr))}
.imgs figure{padding:0;border:0}
.imgs img,.imgs .missing{display:block;width:100%;height:auto;aspect-ratio:1/1;object-fit:contain;background:#eceff2;
border-radius:4px}
.imgs img.px{image-rendering:pixelated}
.imgs .missing{display:flex;align-items:center;justify-content:center;color:var(--muted);font-size:.8rem;
text-align:center;padding:6px}
.imgs figcaption{margin:2px 0 0;font-size:.78rem;overflow-wrap:anywhere}
.card .facts-line{font-size:.86rem;margin:6px 0 0;overflow-wrap:anywhere}
.card .caption{font-style:italic;overflow-wrap:anywhere}
.wrap,code{overflow-wrap:anywhere}
code{font-size:.88em;background:var(--panel);padding:0 3px;border-radius:3px}
details{margin:8px 0}summary{cursor:pointer;color:var(--blue)}
footer{margin-top:40px;color:var(--muted);font-size:.82rem}
@media (max-width:520px){main{padding:12px 10px 40px}header h1{font-size:1.3rem}
.verdict{padding:10px 12px}.verdict .lead{font-size:1.05rem}th,td{padding:4px 6px}
.metric svg.chart text,.dist svg.chart text{font-size:15px}}
@media print{nav{display:none}figure,.card{break-inside:avoid}}
"""
