// Domain errors carry a code and an HTTP status; app.onError renders them as the contract's shape.
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
    readonly status: 400 | 401 | 403 | 404 | 409 | 413 | 415 | 422 | 500 | 503,
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
