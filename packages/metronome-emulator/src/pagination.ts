// Metronome's cursor pagination: `limit` (1 to 100) and an opaque `next_page` cursor, null on the last
// page. The emulator's cursor is the offset of the next item plus a fingerprint of the query, so a
// cursor used with a different query is refused instead of silently skipping items.
import { createHash } from 'node:crypto';
import { badRequest } from './errors.js';
import { MAX_PAGE_LIMIT } from './options.js';

export interface Page<T> {
  data: T[];
  next_page: string | null;
}

const fingerprint = (query: string) => createHash('sha256').update(query).digest('base64url').slice(0, 12);

export function parseLimit(value: string | undefined, fallback: number): number {
  if (value === undefined || value === '') return fallback;
  const n = Number(value);
  if (!Number.isInteger(n) || n < 1 || n > MAX_PAGE_LIMIT)
    throw badRequest(`limit must be an integer from 1 to ${MAX_PAGE_LIMIT}`);
  return n;
}

/** `query` identifies the listing (filters, not the cursor itself). */
export function paginate<T>(
  items: readonly T[],
  limit: number,
  cursor: string | undefined,
  query: string,
): Page<T> {
  let offset = 0;
  if (cursor) {
    const [mark, at] = Buffer.from(cursor, 'base64url').toString('utf8').split(':');
    offset = Number(at);
    if (mark !== fingerprint(query) || !Number.isInteger(offset) || offset < 0)
      throw badRequest('next_page is not a cursor of this query');
  }
  const data = items.slice(offset, offset + limit);
  const next = offset + limit;
  return {
    data,
    next_page:
      next < items.length ? Buffer.from(`${fingerprint(query)}:${next}`).toString('base64url') : null,
  };
}
