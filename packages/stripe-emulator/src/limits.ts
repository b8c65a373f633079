// Account-wide rates: a sliding one-second window on the emulator's clock, so a test with a frozen
// clock sees the limit exactly (the N+1th call within the same second gets a 429). A take has a
// weight: 1 for a call, the events it carries for the v2 stream's events-per-second limit.

export class RateLimiter {
  private readonly taken: { at: number; weight: number }[] = [];
  private used = 0;

  constructor(private perSecond: number) {}

  set limit(perSecond: number) {
    this.perSecond = perSecond;
  }

  get limit(): number {
    return this.perSecond;
  }

  /** Takes `weight` at `now` (ms); false, taking nothing, when the last second's budget would be exceeded. */
  take(now: number, weight = 1): boolean {
    while (this.taken.length > 0 && this.taken[0]!.at <= now - 1000) this.used -= this.taken.shift()!.weight;
    if (this.used + weight > this.perSecond) return false;
    this.taken.push({ at: now, weight });
    this.used += weight;
    return true;
  }

  clear(): void {
    this.taken.length = 0;
    this.used = 0;
  }
}
