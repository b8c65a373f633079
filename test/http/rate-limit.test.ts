// The per-credential token bucket of GET /v1/usage (src/http/rate-limit.ts), on a fake monotonic clock.
import { describe, expect, it } from 'vitest';
import { RateLimiter } from '../../src/http/rate-limit.js';

describe('RateLimiter', () => {
  it('allows perMinute requests at once, then one more per 60/perMinute seconds, per key', () => {
    let now = 1_000;
    const limiter = new RateLimiter(6, () => now);
    for (let i = 0; i < 6; i++) expect(limiter.take('a')).toBe(0);
    // Empty: the next request is allowed in 10 s (6 a minute).
    expect(limiter.take('a')).toBe(10);
    expect(limiter.take('b')).toBe(0);
    now += 9_000;
    expect(limiter.take('a')).toBe(1);
    now += 1_000;
    expect(limiter.take('a')).toBe(0);
    expect(limiter.take('a')).toBeGreaterThan(0);
    // Refilled to perMinute at most, however long the key was idle.
    now += 3_600_000;
    for (let i = 0; i < 6; i++) expect(limiter.take('a')).toBe(0);
    expect(limiter.take('a')).toBeGreaterThan(0);
  });
});
