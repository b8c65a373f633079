// Request parsing with the route's zod schemas: malformed JSON is 400, a schema violation 422 with
// one detail per issue (index of the offending array element when there is one).
import type { Context as HonoContext } from 'hono';
import type { z } from 'zod';
import { AppError, type ErrorDetail } from './errors.js';

export function issuesToDetails(issues: readonly z.core.$ZodIssue[], arrayKey?: string): ErrorDetail[] {
  return issues.map((issue) => {
    const path = issue.path.map(String);
    const detail: ErrorDetail = { field: path.join('.') || undefined, message: issue.message };
    if (arrayKey && path[0] === arrayKey && path[1] !== undefined && /^\d+$/.test(path[1])) {
      detail.index = Number(path[1]);
      detail.field = path.slice(2).join('.') || undefined;
    }
    if (detail.field === undefined) delete detail.field;
    return detail;
  });
}

export async function readJson(c: HonoContext): Promise<unknown> {
  const type = c.req.header('content-type') ?? '';
  if (type && !/^application\/([\w.+-]*\+)?json\b/i.test(type)) {
    throw new AppError(415, 'unsupported_media_type', 'the request body must be application/json');
  }
  const text = await c.req.text();
  try {
    return JSON.parse(text) as unknown;
  } catch {
    throw new AppError(400, 'invalid_json', 'the request body is not valid JSON');
  }
}

export async function parseBody<S extends z.ZodType>(
  c: HonoContext,
  schema: S,
  options: { arrayKey?: string } = {},
): Promise<z.output<S>> {
  const raw = await readJson(c);
  const result = schema.safeParse(raw);
  if (!result.success) {
    throw new AppError(
      422,
      'validation_failed',
      'the request body is invalid',
      issuesToDetails(result.error.issues, options.arrayKey),
    );
  }
  return result.data;
}

export function parseQuery<S extends z.ZodType>(c: HonoContext, schema: S): z.output<S> {
  const result = schema.safeParse(c.req.query());
  if (!result.success) {
    throw new AppError(
      422,
      'validation_failed',
      'the query string is invalid',
      issuesToDetails(result.error.issues),
    );
  }
  return result.data;
}
