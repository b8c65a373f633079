// Asynchronous validation of the v2 meter event stream, as Stripe reports it: events rejected after
// their call was answered 200 are collected per meter over a validation window, then one
// `v1.billing.meter.error_report_triggered` thin event per meter is sent to the webhook endpoint
// (signed), and its full form — with `data.reason.error_types[].sample_errors[].request.identifier`
// — is served from GET /v2/core/events/:id, as Stripe serves it for thin events.
import type { MeterDefinition } from './state.js';
import { meterErrorReportData, meterErrorReportNotification } from './webhook-objects.js';
import { sendWebhook } from './webhooks.js';

/** The thin event type of an error report, as a webhook endpoint's enabled_events names it. */
export const ERROR_REPORT_EVENT = 'v1.billing.meter.error_report_triggered';

export interface RejectedStreamEvent {
  code: string;
  message: string;
  identifier: string | null;
  event_name: string | null;
}

export interface ErrorReporterOptions {
  clock: () => number;
  meters: () => readonly MeterDefinition[];
  /** Where reports are POSTed; without it reports are only kept (served by /v2/core/events/:id). */
  webhookUrl?: string;
  webhookSecret?: string;
  /** Endpoints created through POST /v1/webhook_endpoints that subscribe to error reports. */
  subscribers?: () => readonly { url: string; secret: string }[];
  /** Length of a validation window: the first rejection of a window is reported this much later. */
  windowMs: number;
  onLog?: (level: 'info' | 'warn', msg: string, fields: Record<string, unknown>) => void;
}

export interface ErrorReporter {
  reject(event: RejectedStreamEvent): void;
  /** Where the next reports go (undefined: keep them only). */
  setEndpoint(endpoint: { url: string; secret: string } | undefined): void;
  /** The full event (notification + data) of a report, as GET /v2/core/events/:id returns it. */
  event(id: string): Record<string, unknown> | undefined;
  /** Reports now whatever the open window holds (tests, stop). */
  flush(): Promise<void>;
  /** Drops the open window's rejections and its timer (reset, stop). */
  stop(): void;
}

export function createErrorReporter(options: ErrorReporterOptions): ErrorReporter {
  const pending: RejectedStreamEvent[] = [];
  const events = new Map<string, Record<string, unknown>>();
  let timer: NodeJS.Timeout | undefined;
  let sending: Promise<void> = Promise.resolve();
  let endpoint =
    options.webhookUrl && options.webhookSecret
      ? { url: options.webhookUrl, secret: options.webhookSecret }
      : undefined;

  const report = async (batch: RejectedStreamEvent[]) => {
    const byMeter = new Map<string, RejectedStreamEvent[]>();
    for (const e of batch) {
      const meter = options.meters().find((m) => m.event_name === e.event_name)?.id ?? 'mtr_emu_unknown';
      byMeter.set(meter, [...(byMeter.get(meter) ?? []), e]);
    }
    const created = Math.floor(options.clock() / 1000);
    for (const [meter, errors] of byMeter) {
      const input = {
        meter,
        created,
        errors: errors.map((e) => ({
          code: e.code,
          message: e.message,
          ...(e.identifier ? { identifier: e.identifier } : {}),
        })),
      };
      const notification = meterErrorReportNotification(input);
      const id = String(notification.id);
      events.set(id, { ...notification, data: meterErrorReportData(input) });
      const targets = [...(endpoint ? [endpoint] : []), ...(options.subscribers?.() ?? [])];
      const seen = new Set<string>();
      for (const target of targets) {
        if (seen.has(target.url)) continue;
        seen.add(target.url);
        try {
          const answer = await sendWebhook(target.url, notification, target.secret);
          options.onLog?.(answer.status < 300 ? 'info' : 'warn', 'error report sent', {
            id,
            errors: errors.length,
            status: answer.status,
          });
        } catch (err) {
          options.onLog?.('warn', 'error report not delivered', { id, err: String(err) });
        }
      }
    }
  };

  const flush = () => {
    clearTimeout(timer);
    timer = undefined;
    const batch = pending.splice(0);
    if (batch.length > 0) sending = sending.then(() => report(batch));
    return sending;
  };

  return {
    reject(event) {
      pending.push(event);
      timer ??= setTimeout(() => void flush(), options.windowMs);
    },
    setEndpoint(next) {
      endpoint = next;
    },
    event: (id) => events.get(id),
    flush,
    stop() {
      clearTimeout(timer);
      timer = undefined;
      pending.length = 0;
    },
  };
}
