// Metronome's rules for a POST /v1/ingest body, as a pure function of the body and now: a JSON array
// of 1 to 100 events, each with string transaction_id, customer_id, event_type and an RFC 3339
// timestamp (4-digit year) at most 34 days old and at most 24 hours ahead. One bad event fails the
// whole call; the answer lists every problem found.
import { MAX_BACKDATE_MS, MAX_EVENTS_PER_REQUEST, MAX_FUTURE_MS } from './options.js';

export interface ParsedEvent {
  transaction_id: string;
  customer_id: string;
  event_type: string;
  timestamp: string;
  timestampMs: number;
  properties: Record<string, unknown>;
}

export type IngestCheck = { ok: true; events: ParsedEvent[] } | { ok: false; message: string };

const RFC3339 = /^\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})$/;
const REQUIRED = ['customer_id', 'event_type', 'timestamp', 'transaction_id'] as const;

/** Milliseconds of an RFC 3339 date-time with a 4-digit year, or undefined. */
export function parseRfc3339(value: string): number | undefined {
  if (!RFC3339.test(value)) return undefined;
  const ms = Date.parse(value);
  return Number.isFinite(ms) ? ms : undefined;
}

const typeName = (v: unknown) =>
  v === null ? 'null' : Array.isArray(v) ? 'array' : Number.isInteger(v) ? 'integer' : typeof v;

/**
 * The array-length messages are Metronome's own wording (its answer to an empty array is
 * `[array is too short: must have at least 1 elements but instance has 0 elements]`); the others
 * follow the same style, prefixed with the offending event's JSON pointer.
 */
export function checkIngestBody(body: unknown, now: number): IngestCheck {
  if (!Array.isArray(body)) {
    return {
      ok: false,
      message: `[instance type (${typeName(body)}) does not match any allowed primitive type (allowed: ["array"])]`,
    };
  }
  if (body.length < 1) {
    return {
      ok: false,
      message: `[array is too short: must have at least 1 elements but instance has ${body.length} elements]`,
    };
  }
  if (body.length > MAX_EVENTS_PER_REQUEST) {
    return {
      ok: false,
      message: `[array is too long: must have at most ${MAX_EVENTS_PER_REQUEST} elements but instance has ${body.length} elements]`,
    };
  }
  const problems: string[] = [];
  const events: ParsedEvent[] = [];
  body.forEach((raw: unknown, i) => {
    const at = `/${i}`;
    if (typeof raw !== 'object' || raw === null || Array.isArray(raw)) {
      problems.push(
        `${at}: instance type (${typeName(raw)}) does not match any allowed primitive type (allowed: ["object"])`,
      );
      return;
    }
    const e = raw as Record<string, unknown>;
    const missing = REQUIRED.filter((k) => e[k] === undefined);
    if (missing.length > 0) {
      problems.push(
        `${at}: object has missing required properties (${missing.map((k) => JSON.stringify(k)).join(',')})`,
      );
      return;
    }
    let bad = false;
    for (const k of REQUIRED) {
      const v = e[k];
      if (typeof v !== 'string') {
        problems.push(
          `${at}/${k}: instance type (${typeName(v)}) does not match any allowed primitive type (allowed: ["string"])`,
        );
        bad = true;
      } else if (v.length === 0) {
        problems.push(`${at}/${k}: string is too short (length: 0, required minimum: 1)`);
        bad = true;
      }
    }
    const props = e.properties;
    if (props !== undefined && (typeof props !== 'object' || props === null || Array.isArray(props))) {
      problems.push(
        `${at}/properties: instance type (${typeName(props)}) does not match any allowed primitive type (allowed: ["object"])`,
      );
      bad = true;
    }
    if (bad) return;
    const timestamp = e.timestamp as string;
    const ms = parseRfc3339(timestamp);
    if (ms === undefined) {
      problems.push(`${at}/timestamp: ${timestamp} is not an RFC 3339 date-time with a 4-digit year`);
      return;
    }
    if (ms - now > MAX_FUTURE_MS) {
      problems.push(`${at}/timestamp: ${timestamp} is more than 24 hours in the future`);
      return;
    }
    if (now - ms > MAX_BACKDATE_MS) {
      problems.push(`${at}/timestamp: ${timestamp} is more than 34 days in the past`);
      return;
    }
    events.push({
      transaction_id: e.transaction_id as string,
      customer_id: e.customer_id as string,
      event_type: e.event_type as string,
      timestamp,
      timestampMs: ms,
      properties: { ...((props as Record<string, unknown> | undefined) ?? {}) },
    });
  });
  if (problems.length > 0) return { ok: false, message: `[${problems.join(', ')}]` };
  return { ok: true, events };
}
