// The dashboard's one stylesheet, rendered once into the page head by the Page component
// (dashboard-page.tsx): every page of the admin dashboard uses these classes and no inline style.
export const DASHBOARD_CSS = `
:root { color-scheme: light; --bad: #b42318; --bad-bg: #fee4e2; --ok: #067647; --muted: #5d6b82; --line: #d9dee7; }
* { box-sizing: border-box; }
body { margin: 0; font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1d2433; background: #f6f7f9; }
header { display: flex; flex-wrap: wrap; gap: .5rem; align-items: center; justify-content: space-between; padding: .75rem 1rem; background: #1d2433; color: #fff; }
header h1 { font-size: 1.1rem; margin: 0; }
header form { margin: 0; }
main { max-width: 1100px; margin: 0 auto; padding: 1rem; }
section { background: #fff; border: 1px solid var(--line); border-radius: 8px; padding: 1rem; margin-bottom: 1rem; }
h2 { font-size: 1.05rem; margin: 0 0 .75rem; }
.cards { display: grid; grid-template-columns: repeat(auto-fit, minmax(140px, 1fr)); gap: .75rem; }
.card { border: 1px solid var(--line); border-radius: 8px; padding: .6rem .75rem; }
.card .label { color: var(--muted); font-size: .8rem; }
.card .value { font-size: 1.5rem; font-weight: 600; font-variant-numeric: tabular-nums; }
.card.bad { border-color: var(--bad); background: var(--bad-bg); }
.scroll { overflow-x: auto; -webkit-overflow-scrolling: touch; }
table { border-collapse: collapse; width: 100%; font-variant-numeric: tabular-nums; }
th, td { text-align: left; padding: .4rem .5rem; border-bottom: 1px solid var(--line); white-space: nowrap; vertical-align: top; }
td.num, th.num { text-align: right; }
td.wrap { white-space: normal; min-width: 12rem; word-break: break-word; }
tr.drift td { background: var(--bad-bg); }
td.drift-cell { color: var(--bad); font-weight: 700; }
.muted { color: var(--muted); }
button, input { font: inherit; }
button { border: 1px solid #1d2433; background: #1d2433; color: #fff; border-radius: 6px; padding: .35rem .8rem; cursor: pointer; min-height: 2.25rem; }
button.secondary { background: #fff; color: #1d2433; }
header button { border-color: #fff; }
input { border: 1px solid var(--line); border-radius: 6px; padding: .35rem .5rem; min-height: 2.25rem; max-width: 100%; }
form.inline { display: inline; margin: 0; }
.row { display: flex; flex-wrap: wrap; gap: .5rem; align-items: end; margin-bottom: .75rem; }
.row label { display: flex; flex-direction: column; font-size: .8rem; color: var(--muted); }
.flash { padding: .6rem .8rem; border-radius: 6px; background: #dcfae6; color: var(--ok); margin-bottom: 1rem; }
.flash.error { background: var(--bad-bg); color: var(--bad); }
.chart { position: relative; }
.chart svg { display: block; width: 100%; height: 140px; }
.chart .axis { display: flex; justify-content: space-between; color: var(--muted); font-size: .8rem; }
.row label.check { flex-direction: row; align-items: center; gap: .35rem; color: inherit; font-size: .9rem; min-height: 2.25rem; }
.login { max-width: 380px; margin: 12vh auto; }
.login input { width: 100%; margin: .5rem 0 1rem; }
header nav a { color: #fff; margin-right: .75rem; }
h2.sub { margin-top: 1rem; }
.row.spaced { margin-top: .75rem; }
@media (max-width: 600px) {
  main { padding: .5rem; }
  /* Tables become one card per row: every value and the Retry button stay on screen. */
  table.stack thead { display: none; }
  table.stack, table.stack tbody, table.stack tr, table.stack td { display: block; width: 100%; }
  table.stack tr { border: 1px solid var(--line); border-radius: 8px; margin-bottom: .6rem; padding: .25rem .5rem; }
  table.stack td { display: flex; justify-content: space-between; gap: 1rem; border: 0; padding: .2rem 0; white-space: normal; text-align: right; }
  table.stack td::before { content: attr(data-label); color: var(--muted); text-align: left; flex-shrink: 0; }
  table.stack td.title { font-weight: 600; justify-content: flex-start; }
  table.stack td.title::before { content: none; }
  table.stack td.action { justify-content: flex-end; }
  table.stack td.wrap { min-width: 0; }
  tr.drift { border-color: var(--bad) !important; }
  section { padding: .75rem; }
  .card .value { font-size: 1.25rem; }
  th, td { padding: .35rem .4rem; font-size: .9rem; }
}
`;
