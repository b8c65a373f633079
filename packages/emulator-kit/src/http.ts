// An emulator's Hono app: every failure and unknown path answered in the destination's own error
// shape, an unexpected throw logged and answered as the destination's 500.
import type { HttpBindings } from '@hono/node-server';
import { type Context, Hono } from 'hono';
import type { Log } from './log.js';

export type Env = { Bindings: HttpBindings };
export type Ctx = Context<Env>;
export type App = Hono<Env>;

/** The destination's errors: which throws are its answers, how one is sent, its 500 and its 404. */
export interface ApiErrors<E> {
  is(err: unknown): err is E;
  fail(c: Ctx, err: E): Response;
  internal(): E;
  notFound(c: Ctx): E;
}

export function createApp<E>(log: Log, errors: ApiErrors<E>): App {
  const app = new Hono<Env>();
  app.onError((err, c) => {
    if (errors.is(err)) return errors.fail(c, err);
    log('warn', 'emulator handler failed', { err: String(err), path: c.req.path });
    return errors.fail(c, errors.internal());
  });
  app.notFound((c) => errors.fail(c, errors.notFound(c)));
  return app;
}
