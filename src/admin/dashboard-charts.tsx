// The pipeline's figures on the admin dashboard: the count cards and the last hour's bar charts
// (deliveries, backlog and lag), inline SVG with HTML labels.

import { fmtMs, fmtTime } from './dashboard-format.js';
import type { PipelineOverview } from './outbox.js';

export function Card(props: { label: string; value: string; testId: string; bad?: boolean }) {
  return (
    <div class={props.bad ? 'card bad' : 'card'}>
      <div class="label">{props.label}</div>
      <div class="value" data-testid={props.testId}>
        {props.value}
      </div>
    </div>
  );
}

function Axis() {
  return (
    <div class="axis">
      <span>−60 min</span>
      <span>−30 min</span>
      <span>now</span>
    </div>
  );
}

/**
 * Bars only inside the SVG, stretched to the box (preserveAspectRatio none); labels are HTML so
 * text keeps its size on any screen width.
 */
function Bars(props: {
  heights: number[];
  max: number;
  fill: string;
  titles: string[];
  label: string;
  testId: string;
}) {
  const width = props.heights.length * 10;
  const height = 100;
  return (
    <svg
      viewBox={`0 0 ${width} ${height}`}
      preserveAspectRatio="none"
      role="img"
      aria-label={props.label}
      data-testid={props.testId}
    >
      <line x1="0" y1={height} x2={width} y2={height} stroke="#d9dee7" vector-effect="non-scaling-stroke" />
      {props.heights.map((value, i) => {
        const h = value === 0 ? 0 : Math.max(2, (height * value) / props.max);
        return (
          <rect x={i * 10 + 1} y={(height - h).toFixed(1)} width="8" height={h.toFixed(1)} fill={props.fill}>
            <title>{props.titles[i]}</title>
          </rect>
        );
      })}
    </svg>
  );
}

/** Rows delivered per minute over the last hour as an inline SVG bar chart. */
export function DeliveryChart(props: { buckets: PipelineOverview['deliveredPerMinute'] }) {
  const buckets = props.buckets;
  const total = buckets.reduce((s, b) => s + b.rows, 0);
  const max = Math.max(0, ...buckets.map((b) => b.rows));
  return (
    <div class="chart">
      <div class="axis">
        <span>{total === 0 ? 'no deliveries in the last hour' : `peak ${max} rows/min`}</span>
        <span>{total} rows</span>
      </div>
      <Bars
        heights={buckets.map((b) => b.rows)}
        max={max}
        fill="#2e6bd9"
        titles={buckets.map((b) => `${fmtTime(b.minute)}: ${b.rows} rows, value ${b.value}`)}
        label={`Outbox rows delivered per minute over the last hour: ${total} in total, peak ${max} per minute`}
        testId="delivery-chart"
      />
      <Axis />
    </div>
  );
}

/** Backlog per minute as bars, the minute's delivery lag (average / max) in each bar's tooltip. */
export function BacklogChart(props: { buckets: PipelineOverview['backlogPerMinute'] }) {
  const buckets = props.buckets;
  const max = Math.max(0, ...buckets.map((b) => b.backlog));
  const lags = buckets.flatMap((b) => (b.maxLagMs === null ? [] : [b.maxLagMs]));
  const maxLag = lags.length ? Math.max(...lags) : null;
  const last = buckets.at(-1);
  const title = (b: (typeof buckets)[number]) =>
    `${fmtTime(b.minute)}: backlog ${b.backlog} rows; ${
      b.avgLagMs === null ? 'no deliveries' : `lag avg ${fmtMs(b.avgLagMs)}, max ${fmtMs(b.maxLagMs ?? 0)}`
    }`;
  return (
    <div class="chart">
      <div class="axis">
        <span data-testid="backlog-now">
          backlog now {last?.backlog ?? 0} rows (peak {max})
        </span>
        <span data-testid="lag-max">
          {maxLag === null ? 'no deliveries in the last hour' : `max delivery lag ${fmtMs(maxLag)}`}
        </span>
      </div>
      <Bars
        heights={buckets.map((b) => b.backlog)}
        max={max}
        fill="#b54708"
        titles={buckets.map(title)}
        label={`Undelivered outbox rows at each minute of the last hour: peak ${max}`}
        testId="backlog-chart"
      />
      <Axis />
    </div>
  );
}
