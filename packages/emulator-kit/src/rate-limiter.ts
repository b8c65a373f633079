// Rates on an emulator's clock: a sliding one-second window of weights (1 for a call, the events it
// carries for an events-per-second limit), so a test with a frozen clock sees the limit exactly (the
// N+1th take within the same second is refused).

export class RateLimiter {
  private readonly taken: { at: number; weight: number }[] = [];
  private used = 0;

  /** `perSecond` undefined means no limit. */
  constructor(private perSecond: number | undefined) {}

  get limit(): number | undefined {
    return this.perSecond;
  }

  set limit(perSecond: number | undefined) {
    this.perSecond = perSecond;
  }

  /** Takes `weight` at `now` (ms); false, taking nothing, when the last second's budget would be exceeded. */
  take(now: number, weight = 1): boolean {
    if (this.perSecond === undefined) return true;
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
