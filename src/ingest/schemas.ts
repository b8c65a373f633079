// The zod schemas of the ingestion API (readings, sensors, usage): they validate requests and
// generate the OpenAPI document, so the two cannot disagree.
import { z } from 'zod';
import {
  ARRAY_HEADER_BYTES,
  ELEMENT,
  isHexUuidAt,
  writeArrayHeader,
  writeFloat8Element,
  writeTimestamptzElement,
  writeUuidElement,
} from '../db/binary-arrays.js';
import { isPgInstant, pgInstant, pgText } from '../db/input-types.js';
import { OUTBOX_STATUSES } from '../db/schema.js';

/**
 * Plausible range for a cold-chain sensor, in °C. Anything outside is a broken sensor or a unit
 * mix-up (Fahrenheit, Kelvin) and is rejected rather than billed.
 */
export const TEMPERATURE_MIN_C = -100;
export const TEMPERATURE_MAX_C = 150;
/** Stripe accepts meter timestamps at most 5 minutes ahead; a reading from the future is a clock bug. */
export const MAX_FUTURE_SKEW_MS = 5 * 60 * 1000;
/** Older timestamps are clock resets (1970, year 0), not readings. */
export const EARLIEST_RECORDED_AT = '2000-01-01T00:00:00Z';
const EARLIEST_RECORDED_AT_MS = Date.parse(EARLIEST_RECORDED_AT);

const isoInstant = pgInstant;

/**
 * retentionDays (READINGS_RETENTION_DAYS): a reading older than the retention window is refused
 * here, before any database work — its partition may already be dropped, and storing it again would
 * bill it again (de-duplication only sees stored readings).
 */
export function readingSchema(now: () => Date, retentionDays?: number) {
  return z.object({
    sensorId: z.uuid({ error: 'sensorId must be a sensor id (UUID)' }),
    recordedAt: isoInstant('recordedAt')
      .refine((value) => Date.parse(value) >= EARLIEST_RECORDED_AT_MS, {
        error: `recordedAt must not be before ${EARLIEST_RECORDED_AT}`,
      })
      .refine((value) => Date.parse(value) <= now().getTime() + MAX_FUTURE_SKEW_MS, {
        error: 'recordedAt must not be more than 5 minutes in the future',
      })
      .refine(
        (value) =>
          retentionDays === undefined || Date.parse(value) >= now().getTime() - retentionDays * 86_400_000,
        { error: `recordedAt is older than the retention window (${retentionDays} days)` },
      ),
    temperatureC: z
      .number({ error: 'temperatureC must be a finite number' })
      .min(TEMPERATURE_MIN_C, { error: `temperatureC must be at least ${TEMPERATURE_MIN_C}` })
      .max(TEMPERATURE_MAX_C, { error: `temperatureC must be at most ${TEMPERATURE_MAX_C}` }),
  });
}

export type Reading = z.output<ReturnType<typeof readingSchema>>;

/** The body of POST /v1/readings; `now` is the context's clock (tests move it). */
export function readingsRequestSchema(options: {
  maxBatch: number;
  now: () => Date;
  retentionDays?: number;
}) {
  return z.object({
    readings: z
      .array(readingSchema(options.now, options.retentionDays))
      .min(1, { error: 'readings must contain at least one reading' })
      .max(options.maxBatch, { error: `readings must contain at most ${options.maxBatch} readings` }),
  });
}

// zod's own patterns for z.uuid() and z.iso.datetime({ offset: true }), so the plain loop below
// accepts exactly the ids and date-times readingSchema does.
const UUID_PATTERN = z.regexes.uuid();
const INSTANT_PATTERN = z.regexes.datetime({ offset: true });

/**
 * UUID_PATTERN's common case once the id is known to be 8-4-4-4-12 hex digits (writeUuidElement read it):
 * a version 1-8 and a variant 8, 9, a or b. False is not a refusal: the caller asks the pattern then.
 */
function isVersioned(s: string): boolean {
  const version = s.charCodeAt(14);
  const variant = s.charCodeAt(19) | 0x20;
  return (
    version >= 49 && version <= 56 && (variant === 56 || variant === 57 || variant === 97 || variant === 98)
  );
}

const DAYS_IN_MONTH = [31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31];

/** Two decimal digits at i, or -1. */
function digits2(s: string, i: number): number {
  const a = s.charCodeAt(i) - 48;
  const b = s.charCodeAt(i + 1) - 48;
  return a >= 0 && a <= 9 && b >= 0 && b <= 9 ? a * 10 + b : -1;
}

/**
 * The instant of `YYYY-MM-DDTHH:MM:SSZ` or `YYYY-MM-DDTHH:MM:SS.mmmZ` (what toISOString writes: the
 * common case) in ms, for a year from 1000 and a valid calendar date and time, as INSTANT_PATTERN,
 * isPgInstant and Date.parse take it; NaN for any other text (the caller asks those then).
 */
export function commonInstantMs(s: string): number {
  if (s.length !== 20 && s.length !== 24) return Number.NaN;
  if (s.charCodeAt(s.length - 1) !== 90 /* Z */) return Number.NaN;
  const yh = digits2(s, 0);
  const yl = digits2(s, 2);
  const month = digits2(s, 5);
  const day = digits2(s, 8);
  const hour = digits2(s, 11);
  const minute = digits2(s, 14);
  const second = digits2(s, 17);
  if (
    yh < 10 ||
    yl < 0 ||
    s.charCodeAt(4) !== 45 ||
    s.charCodeAt(7) !== 45 ||
    s.charCodeAt(10) !== 84 /* T */ ||
    s.charCodeAt(13) !== 58 ||
    s.charCodeAt(16) !== 58 ||
    month < 1 ||
    month > 12 ||
    day < 1 ||
    hour < 0 ||
    hour > 23 ||
    minute < 0 ||
    minute > 59 ||
    second < 0 ||
    second > 59
  )
    return Number.NaN;
  const year = yh * 100 + yl;
  const dayKey = (year * 100 + month) * 100 + day;
  if (dayKey !== lastDay.key) {
    const leap = year % 4 === 0 && (year % 100 !== 0 || year % 400 === 0);
    if (day > (month === 2 && leap ? 29 : DAYS_IN_MONTH[month - 1]!)) return Number.NaN;
    lastDay.key = dayKey;
    lastDay.ms = Date.UTC(year, month - 1, day);
  }
  let ms = 0;
  if (s.length === 24) {
    const m1 = digits2(s, 20);
    const m2 = s.charCodeAt(22) - 48;
    if (s.charCodeAt(19) !== 46 /* . */ || m1 < 0 || m2 < 0 || m2 > 9) return Number.NaN;
    ms = m1 * 10 + m2;
  }
  return lastDay.ms + ((hour * 60 + minute) * 60 + second) * 1000 + ms;
}

/**
 * The last valid calendar day commonInstantMs read (year, month and day as one number) and its
 * instant: a batch's readings fall on a day or two, so Date.UTC (a fifth of the function's time) and
 * the calendar check run once a day rather than once a reading.
 */
const lastDay = { key: -1, ms: 0 };

/** The fewest readings a request's fast parse encodes (its `wire`); fewer are encoded with their group's. */
export const WIRE_MIN_READINGS = 16;
const NO_COLUMN = Buffer.alloc(0);

/**
 * A request's readings as the group statement sends them (db/binary-arrays.ts), encoded while they were
 * validated (parseReadingsFast), so that their ids and instants are read once.
 */
export interface ReadingsWire {
  sensor: Buffer;
  recordedAt: Buffer;
  temperature: Buffer;
}

/**
 * readingsRequestSchema's common case in a plain loop: a well-formed batch, returned as zod would return
 * it (each reading's three fields, nothing else), its columns encoded as the group statement sends them
 * (`wire`; absent for fewer than WIRE_MIN_READINGS readings or an instant not in toISOString's form:
 * readingArrays encodes those). zod took 1.9 ms of the API's CPU per batch of 500 (3.9 us a reading).
 * Anything this does not accept is left to the schema (undefined), which then gives the answer and every
 * error detail: this accepts only what the schema accepts (test/ingest/schemas.test.ts and
 * readings-wire.test.ts compare the two). Ids and instants in toISOString's form are checked by plain
 * code as they are encoded, not by zod's patterns, Date.parse and isPgInstant; any other form by those.
 */
export function parseReadingsFast(
  body: unknown,
  options: { maxBatch: number; now: () => Date; retentionDays?: number },
): { readings: Reading[]; wire: ReadingsWire | undefined } | undefined {
  if (typeof body !== 'object' || body === null) return undefined;
  const list = (body as { readings?: unknown }).readings;
  if (!Array.isArray(list) || list.length < 1 || list.length > options.maxBatch) return undefined;
  const nowMs = options.now().getTime();
  const latest = nowMs + MAX_FUTURE_SKEW_MS;
  const oldest =
    options.retentionDays === undefined
      ? Number.NEGATIVE_INFINITY
      : nowMs - options.retentionDays * 86_400_000;
  const n = list.length;
  // A few readings are encoded with their group's (readingArrays): three buffers a request would cost
  // more than the second read of their ids and instants saves.
  let exact = n >= WIRE_MIN_READINGS;
  const sensor = exact ? Buffer.allocUnsafe(ARRAY_HEADER_BYTES + n * 20) : NO_COLUMN;
  const recordedAtColumn = exact ? Buffer.allocUnsafe(ARRAY_HEADER_BYTES + n * 12) : NO_COLUMN;
  const temperature = exact ? Buffer.allocUnsafe(ARRAY_HEADER_BYTES + n * 12) : NO_COLUMN;
  const readings: Reading[] = new Array(n);
  for (let i = 0; i < n; i++) {
    const item: unknown = list[i];
    if (typeof item !== 'object' || item === null || Array.isArray(item)) return undefined;
    const { sensorId, recordedAt, temperatureC } = item as Record<string, unknown>;
    if (typeof sensorId !== 'string') return undefined;
    const hex =
      sensorId.length === 36 &&
      (exact ? writeUuidElement(sensor, ARRAY_HEADER_BYTES + i * 20, sensorId, 0) : isHexUuidAt(sensorId, 0));
    if (!(hex && isVersioned(sensorId)) && !UUID_PATTERN.test(sensorId)) return undefined;
    // The pattern's other ids (nil, max) are in the hex form too; anything else is sent as text.
    exact &&= hex;
    if (typeof recordedAt !== 'string') return undefined;
    let at = commonInstantMs(recordedAt);
    if (Number.isNaN(at)) {
      if (!INSTANT_PATTERN.test(recordedAt) || !isPgInstant(recordedAt)) return undefined;
      at = Date.parse(recordedAt);
      // Another form (an offset, microseconds): readingArrays decides its binary form.
      exact = false;
    } else if (exact) exact = writeTimestamptzElement(recordedAtColumn, ARRAY_HEADER_BYTES + i * 12, at);
    if (!(at >= EARLIEST_RECORDED_AT_MS && at <= latest && at >= oldest)) return undefined;
    if (
      typeof temperatureC !== 'number' ||
      !Number.isFinite(temperatureC) ||
      temperatureC < TEMPERATURE_MIN_C ||
      temperatureC > TEMPERATURE_MAX_C
    )
      return undefined;
    if (exact) writeFloat8Element(temperature, ARRAY_HEADER_BYTES + i * 12, temperatureC);
    readings[i] = { sensorId, recordedAt, temperatureC };
  }
  if (!exact) return { readings, wire: undefined };
  writeArrayHeader(sensor, ELEMENT.uuid, n);
  writeArrayHeader(recordedAtColumn, ELEMENT.timestamptz, n);
  writeArrayHeader(temperature, ELEMENT.float8, n);
  return { readings, wire: { sensor, recordedAt: recordedAtColumn, temperature } };
}

export const readingsResponseSchema = z.object({
  /** Readings stored by this request (and billed, for a billable organization). */
  inserted: z.number().int(),
  /** Readings already stored (same sensorId and recordedAt), including repeats inside the batch. */
  duplicates: z.number().int(),
});
export type ReadingsResult = z.output<typeof readingsResponseSchema>;

export const sensorSchema = z.object({
  id: z.uuid(),
  name: z.string(),
  active: z.boolean(),
  createdAt: z.iso.datetime(),
  updatedAt: z.iso.datetime(),
});
export type SensorView = z.output<typeof sensorSchema>;

const sensorName = pgText('name')
  .trim()
  .min(1, { error: 'name must not be empty' })
  .max(200, { error: 'name must be at most 200 characters' });

export const createSensorSchema = z.object({
  name: sensorName,
  active: z.boolean().default(true),
});

export const updateSensorSchema = z
  .object({ name: sensorName.optional(), active: z.boolean().optional() })
  .refine((patch) => patch.name !== undefined || patch.active !== undefined, {
    error: 'give at least one of active, name',
  });

export const listSensorsQuerySchema = z.object({
  limit: z.coerce.number().int().min(1).max(1000).default(100),
  /** nextCursor of the previous page. */
  cursor: z.uuid({ error: 'cursor must be a nextCursor from a previous page' }).optional(),
  active: z.enum(['true', 'false']).optional(),
});

export const sensorListSchema = z.object({
  sensors: z.array(sensorSchema),
  /** Pass as `cursor` for the next page; null on the last page. */
  nextCursor: z.string().nullable(),
});

export const USAGE_WINDOWS = ['hour', 'day', 'month'] as const;
export type UsageWindow = (typeof USAGE_WINDOWS)[number];
/** An IANA zone name's shape (Europe/Berlin, America/Argentina/Buenos_Aires, UTC, Etc/GMT+5). */
const TIME_ZONE_NAME = /^[A-Za-z][A-Za-z0-9_+-]*(\/[A-Za-z0-9_+-]+){0,2}$/;

export const usageQuerySchema = z
  .object({
    from: isoInstant('from').optional(),
    to: isoInstant('to').optional(),
    window: z
      .enum(USAGE_WINDOWS, { error: 'window must be one of hour, day, month' })
      .optional()
      .describe('cut [from, to) into windows (the windowed answer); without it the totals answer'),
    tz: z
      .string()
      .max(64, { error: 'tz must be an IANA time zone name such as Europe/Berlin' })
      .regex(TIME_ZONE_NAME, { error: 'tz must be an IANA time zone name such as Europe/Berlin' })
      .optional()
      .describe('IANA time zone the windows are cut in (default UTC); needs window'),
    groupBy: z
      .enum(['sensor'], { error: 'groupBy must be sensor' })
      .optional()
      .describe('split each window by sensor; needs window'),
    organizationId: z
      .uuid({ error: 'organizationId must be an organization id (UUID)' })
      .optional()
      .describe("optional; when given it must be the credential's own organization (else 403)"),
  })
  .refine((q) => !q.from || !q.to || Date.parse(q.from) < Date.parse(q.to), {
    error: 'from must be before to',
    path: ['from'],
  })
  .refine((q) => q.window !== undefined || (q.tz === undefined && q.groupBy === undefined), {
    error: 'tz and groupBy need window (hour, day or month)',
    path: ['window'],
  });

const usageByStatus = z.object(
  Object.fromEntries(OUTBOX_STATUSES.map((status) => [status, z.number().int()])) as Record<
    (typeof OUTBOX_STATUSES)[number],
    z.ZodNumber
  >,
);

export const usageResponseSchema = z.object({
  from: z.iso.datetime(),
  to: z.iso.datetime(),
  /** Whether the organization is billed now (subscription active or trial, with a customer). */
  billable: z.boolean(),
  /** Readings stored (by ingestion time) in [from, to), voided ones (usage corrections) excluded. */
  readingsStored: z.number().int(),
  /** temperature_readings meter usage by outbox status, by usage time in [from, to). */
  meteredReadings: usageByStatus,
  /** Usage corrections: readings voided (kept for audit, not billed), by ingestion time. */
  readingsVoided: z.number().int(),
  /** Usage corrections: billed readings taken back from Stripe, by status of the credit. */
  correctedReadings: usageByStatus,
});
export type UsageView = z.output<typeof usageResponseSchema>;

const usageCounts = {
  /** Readings stored (by ingestion time), voided ones excluded. */
  stored: z.number().int().describe('readings stored (by ingestion time), voided ones excluded'),
  voided: z.number().int().describe('readings voided by usage corrections (kept, never billed)'),
  billed: z
    .number()
    .int()
    .describe('of the stored readings, those whose usage the destination recorded (delivered)'),
  pending: z.number().int().describe('of the stored readings, those whose usage is still to be delivered'),
};

export const usageWindowsResponseSchema = z.object({
  from: z.iso.datetime(),
  to: z.iso.datetime(),
  window: z.enum(USAGE_WINDOWS).describe('windowed answer only: the window size asked for'),
  tz: z.string().describe('windowed answer only: the time zone the windows are cut in'),
  groupBy: z.enum(['sensor']).nullable().describe('windowed answer only: sensor when split by sensor'),
  billable: z.boolean(),
  totals: z.object(usageCounts).describe('windowed answer only: the sums over every window'),
  windows: z.array(
    z.object({
      start: z.iso.datetime().describe('first instant of the window (clipped to from)'),
      end: z.iso
        .datetime()
        .describe(
          'end of the window, exclusive (clipped to to): a day with a DST change lasts 23 or 25 hours',
        ),
      localStart: z
        .string()
        .describe("the window's start as wall-clock time in tz, without offset (e.g. 2026-03-29T00:00:00)"),
      ...usageCounts,
      sensors: z
        .array(z.object({ sensorId: z.string(), ...usageCounts }))
        .optional()
        .describe('with groupBy=sensor: the sensors with readings in the window, by id'),
    }),
  ),
});
export type UsageWindowsView = z.output<typeof usageWindowsResponseSchema>;
