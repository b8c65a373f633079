// Input validators that match the database's column types, so input that passes validation is never
// refused by Postgres (which would answer 500, look retryable, and log a stack): text without NUL
// characters, timestamps with the UTC offsets and years timestamptz accepts, ids and cursors within
// bigint, integers within int4. Every API schema builds on these.
import { z } from 'zod';

/** Largest value of a Postgres bigint (int8). */
export const BIGINT_MAX = 9_223_372_036_854_775_807n;
/** Postgres accepts UTC offsets up to 15:59 either way (+16:00 and beyond are refused). */
export const MAX_UTC_OFFSET_MINUTES = 15 * 60 + 59;

/** Text for a `text` column: Postgres cannot store U+0000. */
export function pgText(what: string) {
  return z.string().refine((value) => !value.includes('\u0000'), {
    error: `${what} must not contain NUL characters`,
  });
}

/** The ±hh:mm offset of an ISO-8601 date-time in minutes (0 for Z or none). */
export function utcOffsetMinutes(value: string): number {
  const match = /([+-])(\d{2}):?(\d{2})$/.exec(value);
  if (!match || value.endsWith('Z') || value.endsWith('z')) return 0;
  const minutes = Number(match[2]) * 60 + Number(match[3]);
  return match[1] === '-' ? -minutes : minutes;
}

/** Postgres has no year 0: ISO's 0000 (1 BC in JavaScript) is refused. */
const hasYear = (value: string) => !value.startsWith('0000');

/** True when Postgres's timestamptz takes this ISO date-time as it is (offset and instant in range). */
export function isPgInstant(value: string): boolean {
  if (!hasYear(value) || Math.abs(utcOffsetMinutes(value)) > MAX_UTC_OFFSET_MINUTES) return false;
  return Number.isFinite(Date.parse(value));
}

/** An ISO-8601 instant with Z or a ±hh:mm offset that timestamptz accepts. */
export function pgInstant(what: string) {
  return z.iso
    .datetime({
      offset: true,
      error: `${what} must be an ISO-8601 date-time with Z or a ±hh:mm offset, e.g. 2026-11-21T10:00:00Z`,
    })
    .refine(isPgInstant, { error: `${what} must have a UTC offset between -15:59 and +15:59` });
}

/** An instant (as pgInstant) or a plain date (midnight UTC), as a Date: the admin filters' bounds. */
export function pgDateOrInstant(what: string) {
  return pgInstant(what)
    .or(
      z.iso.date().refine((d) => hasYear(d) && Number.isFinite(Date.parse(d)), {
        error: `${what} must be a valid date`,
      }),
    )
    .transform((v) => new Date(v));
}

/** A positive bigint id or keyset cursor, as its decimal string. */
export function bigintId(message: string) {
  return z.string().refine((value) => {
    // One check: zod runs every refinement even after a failed one, and BigInt('abc') throws.
    if (!/^\d{1,19}$/.test(value)) return false;
    const n = BigInt(value);
    return n >= 1n && n <= BIGINT_MAX;
  }, message);
}
