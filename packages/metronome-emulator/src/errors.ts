// Metronome-shaped API errors: every 4xx body is `{"message": "..."}` (Metronome's status-code
// page); the emulator answers its 5xx the same way so clients parse one shape.

export type ErrorStatus = 400 | 403 | 404 | 409 | 429 | 500 | 503;

export interface MetronomeErrorBody {
  message: string;
}

export class MetronomeApiError extends Error {
  constructor(
    readonly status: ErrorStatus,
    message: string,
  ) {
    super(message);
    this.name = 'MetronomeApiError';
  }

  body(): MetronomeErrorBody {
    return { message: this.message };
  }
}

export const badRequest = (message: string) => new MetronomeApiError(400, message);
export const notFound = (message: string) => new MetronomeApiError(404, message);
export const conflict = (message: string) => new MetronomeApiError(409, message);
/** What Metronome answers a bad or missing token (seen on /v1/ingest: 403 `Unauthorized`). */
export const unauthorized = () => new MetronomeApiError(403, 'Unauthorized');
/** Metronome documents 429 "Too many requests hit the API too quickly"; its body wording is not published. */
export const tooManyRequests = () => new MetronomeApiError(429, 'Too Many Requests');
export const internalError = () => new MetronomeApiError(500, 'Internal Server Error');
export const unavailable = () => new MetronomeApiError(503, 'Service Unavailable');
