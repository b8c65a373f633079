// A per-credential request limit for read routes (GET /v1/usage), kept in the API process's memory:
// a token bucket of `perMinute` requests refilled continuously. Per process by design (no table, no
// round trip): with N API processes a credential gets up to N times the limit, which is what it is
// for (keeping one customer's dashboard from hammering the database), not a billing quota.
import type { MiddlewareHandler } from 'hono';
import { AppError } from './errors.js';
import type { AppEnv } from './types.js';

interface Bucket {
  tokens: number;
  at: number;
}

/** Most credentials tracked; past it, full buckets (idle credentials) and then the oldest are dropped. */
const MAX_BUCKETS = 10_000;

export class RateLimiter {
  private readonly buckets = new Map<string, Bucket>();
  private readonly perMs: number;

  constructor(
    private readonly perMinute: number,
    /** Elapsed time in ms; a monotonic clock, so a wall-clock step never refills or drains buckets. */
    private readonly nowMs: () => number = () => performance.now(),
  ) {
    this.perMs = perMinute / 60_000;
  }

  /** Takes one request from `key`'s bucket: 0 when allowed, else the seconds until one is. */
  take(key: string): number {
    const now = this.nowMs();
    const bucket = this.buckets.get(key) ?? { tokens: this.perMinute, at: now };
    bucket.tokens = Math.min(this.perMinute, bucket.tokens + (now - bucket.at) * this.perMs);
    bucket.at = now;
    // Re-inserted so the map's order is least recently used first.
    this.buckets.delete(key);
    this.buckets.set(key, bucket);
    if (this.buckets.size > MAX_BUCKETS) this.evict(now);
    if (bucket.tokens >= 1) {
      bucket.tokens -= 1;
      return 0;
    }
    return Math.max(1, Math.ceil((1 - bucket.tokens) / this.perMs / 1000));
  }

  private evict(now: number): void {
    for (const [key, b] of this.buckets) {
      if (b.tokens + (now - b.at) * this.perMs >= this.perMinute) this.buckets.delete(key);
    }
    for (const key of this.buckets.keys()) {
      if (this.buckets.size <= MAX_BUCKETS) break;
      this.buckets.delete(key);
    }
  }
}

/**
 * 429 `rate_limited` with Retry-After once the calling credential (set by auth as c.var.credential)
 * used up its bucket. perMinute 0: no limit.
 */
export function rateLimitPerCredential(limiter: RateLimiter | undefined): MiddlewareHandler<AppEnv> {
  return async (c, next) => {
    const credential = c.get('credential');
    if (limiter && credential) {
      const wait = limiter.take(credential);
      if (wait > 0) {
        throw new AppError(
          429,
          'rate_limited',
          `too many requests with this credential; retry in ${wait} s`,
          [],
          { 'Retry-After': String(wait) },
        );
      }
    }
    await next();
  };
}
