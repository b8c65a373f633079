// Account-wide call rate: a sliding one-second window on the emulator's clock, so a test with a
// frozen clock sees the limit exactly (the N+1th call within the same second gets a 429).

export class RateLimiter {
  private readonly calls: number[] = [];

  constructor(private perSecond: number) {}

  set limit(perSecond: number) {
    this.perSecond = perSecond;
  }

  get limit(): number {
    return this.perSecond;
  }

  /** Takes a slot at `now` (ms); false when perSecond calls already happened in the last second. */
  take(now: number): boolean {
    while (this.calls.length > 0 && this.calls[0]! <= now - 1000) this.calls.shift();
    if (this.calls.length >= this.perSecond) return false;
    this.calls.push(now);
    return true;
  }

  clear(): void {
    this.calls.length = 0;
  }
}
