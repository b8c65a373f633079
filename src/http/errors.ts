// Domain errors carry a code and an HTTP status; app.onError renders them as the contract's shape.
import type { DatabaseResourceKind } from '../db/errors.js';

export type ErrorCode =
  | 'bad_request'
  | 'invalid_json'
  | 'validation_failed'
  | 'unauthorized'
  | 'forbidden'
  | 'not_found'
  | 'conflict'
  | 'idempotency_conflict'
  | 'payload_too_large'
  | 'headers_too_large'
  | 'request_timeout'
  | 'unsupported_media_type'
  | 'rate_limited'
  | 'not_configured'
  | 'unavailable'
  | 'internal';

export interface ErrorDetail {
  index?: number;
  field?: string;
  message: string;
}

export class AppError extends Error {
  constructor(
    readonly status: 400 | 401 | 403 | 404 | 409 | 413 | 415 | 422 | 429 | 500 | 503,
    readonly code: ErrorCode,
    message: string,
    readonly details: readonly ErrorDetail[] = [],
    readonly headers: Readonly<Record<string, string>> = {},
  ) {
    super(message);
    this.name = 'AppError';
  }
}

export const notFound = (what: string) => new AppError(404, 'not_found', `${what} not found`);
export const unauthorized = (message = 'missing or invalid credentials') =>
  new AppError(401, 'unauthorized', message, [], { 'WWW-Authenticate': 'Bearer' });
export const databaseUnavailable = () =>
  new AppError(503, 'unavailable', 'the database is unavailable; retry later', [], { 'Retry-After': '5' });

/**
 * What the client is told when the database is out of a resource: what is short and when to retry
 * (the operator is alerted: MeterboxDatabaseResourceExhausted). A write that got it stored nothing.
 */
const SHORTAGE: Readonly<Record<DatabaseResourceKind, { message: string; retryAfterSeconds: number }>> = {
  disk_full: { message: 'the database is out of disk space', retryAfterSeconds: 30 },
  out_of_memory: { message: 'the database is out of memory', retryAfterSeconds: 10 },
  connections: { message: 'the database has no free connections', retryAfterSeconds: 5 },
  configuration_limit: { message: 'the database reached a configured limit', retryAfterSeconds: 10 },
  insufficient_resources: { message: 'the database is short of resources', retryAfterSeconds: 10 },
};

export const databaseResourceExhausted = (kind: DatabaseResourceKind) => {
  const { message, retryAfterSeconds } = SHORTAGE[kind];
  return new AppError(503, 'unavailable', `${message}; retry later`, [], {
    'Retry-After': String(retryAfterSeconds),
  });
};

export interface ErrorBody {
  error: { code: ErrorCode; message: string; details: ErrorDetail[] };
}

export function errorBody(err: AppError): ErrorBody {
  return { error: { code: err.code, message: err.message, details: [...err.details] } };
}

/**
 * The client closed its connection while its request body was still being read (Node's `aborted`,
 * ECONNRESET): nobody is left to answer, and nothing went wrong on the server.
 */
export function isClientAbort(err: unknown): boolean {
  return (
    err instanceof Error &&
    err.message === 'aborted' &&
    (err as Error & { code?: unknown }).code === 'ECONNRESET'
  );
}
