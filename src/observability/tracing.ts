// OpenTelemetry tracing through @opentelemetry/api only: spans for a readings request and for the
// destination call that bills it, joined by the W3C trace context stored on the outbox row
// (meter_outbox.traceparent, migrations/0051). Without an SDK registered by the operator (see
// docs/operations.md, "Tracing a reading") the API hands out no-op spans: nothing is recorded, no
// trace context exists, the column stays NULL and the worker reads nothing back.
import {
  context,
  isSpanContextValid,
  type Link,
  type Context as OtelContext,
  propagation,
  type Span,
  type SpanContext,
  SpanKind,
  SpanStatusCode,
  type TextMapGetter,
  TraceFlags,
  trace,
} from '@opentelemetry/api';

/** The instrumentation scope name of meterbox's spans. */
export const TRACER_NAME = 'meterbox';

function tracer() {
  // Looked up at each use: an SDK registered after this module loaded is found (the API's proxy).
  return trace.getTracer(TRACER_NAME);
}

/** The span's context as a W3C traceparent header value, or null for a no-op span. */
export function traceparentOf(span: Span | undefined): string | null {
  const sc = span?.spanContext();
  if (!sc || !isSpanContextValid(sc)) return null;
  const flags = (sc.traceFlags & 0xff).toString(16).padStart(2, '0');
  return `00-${sc.traceId}-${sc.spanId}-${flags}`;
}

const TRACEPARENT = /^00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$/;

/** A stored traceparent as a remote span context, or undefined when it is not one. */
export function spanContextOf(traceparent: string | null | undefined): SpanContext | undefined {
  const m = TRACEPARENT.exec(traceparent ?? '');
  if (!m) return undefined;
  const sc: SpanContext = {
    traceId: m[1]!,
    spanId: m[2]!,
    traceFlags: Number.parseInt(m[3]!, 16) & TraceFlags.SAMPLED,
    isRemote: true,
  };
  return isSpanContextValid(sc) ? sc : undefined;
}

/**
 * An incoming request's headers as a propagator reads them: one by name (`get`), all names only when a
 * propagator asks (`names`: W3C trace context asks none). Read lazily: a request's whole header set
 * built as an object for every request was 6% of the API's CPU a single-reading request (its profile),
 * and without a propagator registered nothing is read at all.
 */
export interface HeaderSource {
  get(name: string): string | undefined;
  names(): string[];
}

const HEADERS: TextMapGetter<HeaderSource> = {
  get: (carrier, key) => carrier.get(key),
  keys: (carrier) => carrier.names(),
};

/**
 * Runs `fn` inside a span that is the active one (so spans made by instrumentation below it are its
 * children), ending it with an error status when `fn` throws. `headers`: an incoming request's, whose
 * trace context (traceparent) the registered propagator extracts; with none registered, nothing.
 */
export async function inSpan<T>(
  name: string,
  options: {
    kind?: SpanKind;
    attributes?: Record<string, string | number | boolean>;
    headers?: HeaderSource;
  },
  fn: (span: Span) => Promise<T>,
): Promise<T> {
  const parent: OtelContext = options.headers
    ? propagation.extract(context.active(), options.headers, HEADERS)
    : context.active();
  return tracer().startActiveSpan(
    name,
    {
      kind: options.kind ?? SpanKind.INTERNAL,
      ...(options.attributes ? { attributes: options.attributes } : {}),
    },
    parent,
    async (span) => {
      try {
        return await fn(span);
      } catch (err) {
        span.recordException(err instanceof Error ? err : String(err));
        span.setStatus({ code: SpanStatusCode.ERROR });
        throw err;
      } finally {
        span.end();
      }
    },
  );
}

/**
 * A span for a destination call that carries the usage of the requests whose traceparents are given:
 * a child of the first (so one reading's request and its delivery are one trace) with links to every
 * one (a coalesced call bills many requests). Not made active: the call is not traced below it.
 */
export function startDeliverySpan(
  name: string,
  traceparents: readonly string[],
  attributes: Record<string, string | number | boolean>,
): Span {
  const contexts = traceparents.map(spanContextOf).filter((sc): sc is SpanContext => sc !== undefined);
  const first = contexts[0];
  const parent = first ? trace.setSpanContext(context.active(), first) : context.active();
  const links: Link[] = contexts.map((sc) => ({ context: sc }));
  return tracer().startSpan(name, { kind: SpanKind.CLIENT, attributes, links }, parent);
}

/** The active span, if any (an HTTP server span of the operator's instrumentation). */
export function activeSpan(): Span | undefined {
  return trace.getActiveSpan();
}

/** A span of its own (a delivery batch): recording only when an SDK is registered and samples it. */
export function startSpan(name: string, attributes: Record<string, string | number | boolean>): Span {
  return tracer().startSpan(name, { kind: SpanKind.INTERNAL, attributes });
}

export { SpanKind, SpanStatusCode };
