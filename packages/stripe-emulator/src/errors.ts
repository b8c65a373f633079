// Stripe-shaped API errors: the body `{error: {type, code, message, param, doc_url}}` and the headers
// Stripe sends with it, so the real SDK maps them to the same error classes it would against Stripe.

export type StripeErrorType =
  | 'invalid_request_error'
  | 'api_error'
  | 'idempotency_error'
  | 'rate_limit'
  | 'temporary_session_expired';

export interface StripeErrorBody {
  error: {
    type: StripeErrorType;
    code?: string;
    message: string;
    param?: string;
    doc_url?: string;
    request_log_url?: string;
  };
}

export class StripeApiError extends Error {
  constructor(
    readonly status: 400 | 401 | 403 | 404 | 409 | 429 | 500,
    readonly type: StripeErrorType,
    message: string,
    readonly code?: string,
    readonly param?: string,
    readonly headers: Readonly<Record<string, string>> = {},
  ) {
    super(message);
    this.name = 'StripeApiError';
  }

  body(): StripeErrorBody {
    const error: StripeErrorBody['error'] = { type: this.type, message: this.message };
    if (this.code) {
      error.code = this.code;
      error.doc_url = `https://stripe.com/docs/error-codes/${this.code.replaceAll('_', '-')}`;
    }
    if (this.param) error.param = this.param;
    return { error };
  }
}

export const missingParam = (param: string) =>
  new StripeApiError(
    400,
    'invalid_request_error',
    `Missing required param: ${param}.`,
    'parameter_missing',
    param,
  );

/** Stripe's wording for an over-long string parameter. */
export const stringTooLong = (param: string, value: string, max: number) =>
  new StripeApiError(
    400,
    'invalid_request_error',
    `Invalid string: ${value.slice(0, 20)}...; must be at most ${max} characters`,
    'string_too_long',
    param,
  );

export const invalidInteger = (param: string, value: string) =>
  new StripeApiError(
    400,
    'invalid_request_error',
    `Invalid integer: ${value}`,
    'parameter_invalid_integer',
    param,
  );

export const noSuchCustomer = (id: string, param: string) =>
  new StripeApiError(400, 'invalid_request_error', `No such customer: '${id}'`, 'resource_missing', param);

export const unauthorized = (message: string) => new StripeApiError(401, 'invalid_request_error', message);

/**
 * Stripe answers a 429 with `Stripe-Rate-Limited-Reason` naming the limiter that tripped
 * (global-rate, global-concurrency, endpoint-rate, endpoint-concurrency, resource-specific).
 */
export const rateLimited = (
  reason: 'endpoint-rate' | 'resource-specific' | 'global-rate',
  message?: string,
) =>
  new StripeApiError(
    429,
    'invalid_request_error',
    message ??
      'Request rate limit exceeded. You can learn more about rate limits here https://stripe.com/docs/rate-limits.',
    'rate_limit',
    undefined,
    { 'Stripe-Rate-Limited-Reason': reason },
  );

export const internalError = () =>
  new StripeApiError(
    500,
    'api_error',
    'An unknown error occurred while processing your request. Please try again.',
    undefined,
    undefined,
  );
