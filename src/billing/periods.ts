// A Stripe subscription's billing periods, and where a period-boundary migration cuts over: pure
// functions of what Stripe says (the current period, the price's interval, the billing cycle anchor)
// and of now, so the decision is the same whoever computes it and is tested without a clock.

export type BillingInterval = 'day' | 'week' | 'month' | 'year';

/** What meterbox reads of the organization's Stripe subscription. */
export interface StripeBillingPeriod {
  subscriptionId: string;
  periodStart: Date;
  periodEnd: Date;
  anchor: Date;
  interval: BillingInterval;
  intervalCount: number;
}

const HOUR_MS = 3_600_000;
const DAY_MS = 24 * HOUR_MS;

/**
 * The end of the period that starts at `from`: months and years keep the anchor's day of month (the
 * last day of a shorter month) and time of day, as Stripe's billing cycle does.
 */
export function periodEndAfter(anchor: Date, from: Date, interval: BillingInterval, count: number): Date {
  if (interval === 'day') return new Date(from.getTime() + count * DAY_MS);
  if (interval === 'week') return new Date(from.getTime() + count * 7 * DAY_MS);
  const months = interval === 'month' ? count : 12 * count;
  const y = from.getUTCFullYear();
  const m = from.getUTCMonth() + months;
  const lastDay = new Date(Date.UTC(y, m + 1, 0)).getUTCDate();
  return new Date(
    Date.UTC(
      y,
      m,
      Math.min(anchor.getUTCDate(), lastDay),
      anchor.getUTCHours(),
      anchor.getUTCMinutes(),
      anchor.getUTCSeconds(),
    ),
  );
}

export interface PeriodCutOverPlan {
  /** The hour boundary the parallel run starts at (the next one at least the lead ahead, or one under way). */
  shadowFrom: Date;
  /** The first Stripe period both destinations receive whole: [periodStart, periodEnd). */
  periodStart: Date;
  periodEnd: Date;
  /** The hour boundary the new destination bills from: periodEnd, or the hour just before it. */
  cutOverAt: Date;
  /** False when Stripe's period does not end on an hour boundary (the cut-over is the hour before it). */
  aligned: boolean;
}

/**
 * Where a parallel run that starts at `shadowFrom` cuts over: at the end of the first Stripe billing
 * period that starts at or after it, so one whole period is invoiced by the old destination and
 * shadowed by the new one (Stripe's month-boundary parallel run). `notBefore` (now + the lead) keeps
 * a boundary that is too close from being chosen.
 */
export function planPeriodCutOver(
  period: StripeBillingPeriod,
  shadowFrom: Date,
  notBefore: Date,
): PeriodCutOverPlan {
  let start = period.periodStart;
  let end = period.periodEnd;
  for (let guard = 0; ; guard++) {
    if (guard > 1000) throw new Error('no billing period found after the parallel run starts');
    const cutOverAt = new Date(Math.floor(end.getTime() / HOUR_MS) * HOUR_MS);
    if (start.getTime() >= shadowFrom.getTime() && cutOverAt.getTime() >= notBefore.getTime()) {
      return {
        shadowFrom,
        periodStart: start,
        periodEnd: end,
        cutOverAt,
        aligned: cutOverAt.getTime() === end.getTime(),
      };
    }
    start = end;
    end = periodEndAfter(period.anchor, end, period.interval, period.intervalCount);
  }
}

/** A Metronome customer's billable status from an instant on (Metronome's setBillableStatus). */
export interface BillableChange {
  status: 'billable' | 'unbillable';
  effectiveAt: Date;
}

/**
 * Stripe's guide: the Metronome customer shadows unbillable (its invoices are generated for comparison
 * and never sent) and is billable from the cut-over, so each reading is invoiced by exactly one system.
 */
export function billableSchedule(cutOverAt: Date, now: Date): BillableChange[] {
  return [
    { status: 'unbillable', effectiveAt: now },
    { status: 'billable', effectiveAt: cutOverAt },
  ];
}
