// The operator artefacts under deploy/ against the code: every metric the alert rules and the Grafana
// dashboard query is one meterbox exports (read from the registry the API and the worker build, not a
// list kept here), with label names the metric has; every alert has a runbook section; the dashboard
// is an importable Grafana document. (`promtool test rules` checks the rules' behaviour in CI.)
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { parse } from 'yaml';
import { createMetrics } from '../src/observability/metrics.js';
import { ROOT } from './support/processes.js';

const read = (file: string) => readFileSync(join(ROOT, file), 'utf8');

/** Series Prometheus makes itself, not a process: `up` is the scrape's own answer. */
const PROMETHEUS_SERIES = new Set(['up']);
/** Labels Prometheus adds to every scraped series (and `le` of histogram buckets). */
const TARGET_LABELS = new Set(['job', 'instance']);

const KEYWORDS = new Set(['and', 'or', 'unless', 'by', 'without', 'on', 'ignoring', 'bool', 'offset']);

/** The series each PromQL expression selects, with the label names it matches on. */
function selectors(expr: string): { metric: string; labels: string[] }[] {
  const found: { metric: string; labels: string[] }[] = [];
  // Strings first (label values, regexes), then grouping clauses and range/subquery brackets.
  const code = expr
    .replace(/"(?:[^"\\]|\\.)*"/g, '""')
    .replace(/\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)/g, ' ')
    .replace(/\[[^\]]*\]/g, ' ');
  const token = /([a-zA-Z_:][a-zA-Z0-9_:]*)\s*(\{[^}]*\})?\s*(\()?/g;
  for (const match of code.matchAll(token)) {
    const [, name, braces, call] = match;
    if (!name || call || KEYWORDS.has(name)) continue;
    const labels = [...(braces ?? '').matchAll(/([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!=|!~|=)/g)].map((m) => m[1]!);
    found.push({ metric: name, labels });
  }
  return found;
}

/** Every series name meterbox exposes, with its label names (histograms: _bucket, _sum, _count). */
function exported(): Map<string, Set<string>> {
  const metrics = createMetrics();
  const names = new Map<string, Set<string>>();
  for (const metric of metrics.registry.getMetricsAsArray()) {
    const labels = new Set((metric as unknown as { labelNames: string[] }).labelNames);
    const type = (metric as unknown as { type?: string }).type;
    const name = (metric as unknown as { name: string }).name;
    names.set(name, labels);
    if (type === 'histogram' || type === 'summary') {
      names.set(`${name}_bucket`, new Set([...labels, 'le']));
      names.set(`${name}_sum`, labels);
      names.set(`${name}_count`, labels);
    }
  }
  return names;
}

interface AlertRule {
  alert: string;
  expr: string;
  annotations?: Record<string, string>;
}

function alertRules(): AlertRule[] {
  const doc = parse(read('deploy/prometheus/alerts.yml')) as { groups: { rules: AlertRule[] }[] };
  return doc.groups.flatMap((g) => g.rules);
}

interface Panel {
  type: string;
  title: string;
  targets?: { expr: string; refId: string }[];
}

function dashboardExprs(): { where: string; expr: string }[] {
  const dashboard = JSON.parse(read('deploy/grafana/meterbox.json')) as { panels: Panel[] };
  return dashboard.panels.flatMap((p) =>
    (p.targets ?? []).map((t) => ({ where: `panel "${p.title}"`, expr: t.expr })),
  );
}

function checkExprs(exprs: { where: string; expr: string }[]): string[] {
  const known = exported();
  const problems: string[] = [];
  for (const { where, expr } of exprs) {
    const found = selectors(expr);
    if (found.length === 0) problems.push(`${where}: selects no series: ${expr}`);
    for (const { metric, labels } of found) {
      if (PROMETHEUS_SERIES.has(metric)) continue;
      const metricLabels = known.get(metric);
      if (!metricLabels) {
        problems.push(`${where}: ${metric} is not a metric meterbox exports`);
        continue;
      }
      for (const label of labels) {
        if (!metricLabels.has(label) && !TARGET_LABELS.has(label))
          problems.push(`${where}: ${metric} has no label "${label}"`);
      }
    }
  }
  return problems;
}

describe('alert rules and dashboard against the exported metrics', () => {
  it('reads selectors from PromQL (the checker itself)', () => {
    expect(
      selectors(
        'sum(rate(a_total{outcome="x", job=~"m.*"}[5m])) / sum by (le) (b_bucket) > 0 and on () absent(c) or time() - d > 1',
      ),
    ).toEqual([
      { metric: 'a_total', labels: ['outcome', 'job'] },
      { metric: 'b_bucket', labels: [] },
      { metric: 'c', labels: [] },
      { metric: 'd', labels: [] },
    ]);
    // A name that is not exported, and a label a metric lacks, are reported.
    expect(checkExprs([{ where: 't', expr: 'meterbox_no_such_metric > 0' }])).toEqual([
      't: meterbox_no_such_metric is not a metric meterbox exports',
    ]);
    expect(checkExprs([{ where: 't', expr: 'meterbox_dead_letter_jobs{meter="x"}' }])).toEqual([
      't: meterbox_dead_letter_jobs has no label "meter"',
    ]);
  });

  it('every alert rule queries metrics meterbox exports, with their labels', () => {
    const rules = alertRules();
    expect(rules.length).toBeGreaterThanOrEqual(9);
    expect(checkExprs(rules.map((r) => ({ where: `alert ${r.alert}`, expr: r.expr })))).toEqual([]);
  });

  it('every dashboard panel queries metrics meterbox exports, with their labels', () => {
    const exprs = dashboardExprs();
    expect(exprs.length).toBeGreaterThanOrEqual(20);
    expect(checkExprs(exprs)).toEqual([]);
  });

  it('every alert has a severity, a summary and a runbook_url naming a section of docs/runbooks.md', () => {
    const runbooks = read('docs/runbooks.md');
    // GitHub's anchors: the heading lower-cased, spaces to hyphens, punctuation dropped.
    const anchors = new Set(
      [...runbooks.matchAll(/^#{2,3} (.+)$/gm)].map((m) =>
        m[1]!
          .trim()
          .toLowerCase()
          .replace(/[^a-z0-9 -]/g, '')
          .replace(/ /g, '-'),
      ),
    );
    const doc = parse(read('deploy/prometheus/alerts.yml')) as {
      groups: { rules: (AlertRule & { labels?: Record<string, string> })[] }[];
    };
    for (const rule of doc.groups.flatMap((g) => g.rules)) {
      expect(rule.labels?.severity, rule.alert).toMatch(/^(warning|critical)$/);
      expect(rule.annotations?.summary, rule.alert).toBeTruthy();
      const url = rule.annotations?.runbook_url ?? '';
      expect(url, rule.alert).toMatch(/^docs\/runbooks\.md#/);
      expect(anchors, `${rule.alert}: ${url}`).toContain(url.split('#')[1]);
    }
  });

  it('every alert is exercised by alerts.test.yml', () => {
    const tests = parse(read('deploy/prometheus/alerts.test.yml')) as {
      rule_files: string[];
      tests: { alert_rule_test: { alertname: string; exp_alerts: unknown[] }[] }[];
    };
    expect(tests.rule_files).toEqual(['alerts.yml']);
    const firing = new Set(
      tests.tests.flatMap((t) =>
        t.alert_rule_test.filter((a) => a.exp_alerts.length > 0).map((a) => a.alertname),
      ),
    );
    const silent = new Set(
      tests.tests.flatMap((t) =>
        t.alert_rule_test.filter((a) => a.exp_alerts.length === 0).map((a) => a.alertname),
      ),
    );
    for (const rule of alertRules()) {
      expect(firing, `${rule.alert} is never shown firing`).toContain(rule.alert);
      expect(silent, `${rule.alert} is never shown silent`).toContain(rule.alert);
    }
  });

  it('the dashboard is an importable Grafana document on a Prometheus datasource variable', () => {
    const dashboard = JSON.parse(read('deploy/grafana/meterbox.json')) as {
      uid: string;
      title: string;
      schemaVersion: number;
      templating: { list: { name: string; type: string; query: string }[] };
      panels: (Panel & { id: number; datasource?: { uid: string } })[];
    };
    expect(dashboard.uid).toBe('meterbox');
    expect(dashboard.schemaVersion).toBeGreaterThanOrEqual(30);
    expect(dashboard.templating.list).toContainEqual(
      expect.objectContaining({ name: 'datasource', type: 'datasource', query: 'prometheus' }),
    );
    const ids = dashboard.panels.map((p) => p.id);
    expect(new Set(ids).size).toBe(ids.length);
    for (const panel of dashboard.panels.filter((p) => p.type !== 'row')) {
      // Grafana's variable syntax, not a template literal.
      expect(panel.datasource?.uid, panel.title).toBe(['$', '{datasource}'].join(''));
      expect(panel.targets?.length, panel.title).toBeGreaterThan(0);
    }
    // What the issue asks the dashboard to show.
    const all = dashboardExprs()
      .map((e) => e.expr)
      .join('\n');
    for (const metric of [
      'meterbox_readings_ingested_total',
      'meterbox_http_request_duration_seconds_bucket',
      'meterbox_outbox_rows',
      'meterbox_outbox_oldest_pending_age_seconds',
      'meterbox_outbox_rows_delivered_total',
      'meterbox_stripe_calls_total',
      'meterbox_delivery_rate_limited_total',
      'meterbox_delivery_budget_calls_per_second',
      'meterbox_dead_letter_jobs',
      'meterbox_webhook_events_total',
      'meterbox_task_last_success_timestamp_seconds',
      'meterbox_database_size_bytes',
    ])
      expect(all).toContain(metric);
  });
});
