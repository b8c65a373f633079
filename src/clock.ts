// The one source of "now" for the application: every time-dependent path takes a Clock, so tests
// can move time (the emulator has its own clock for Stripe's side).
export interface Clock {
  now(): Date;
}

export const systemClock: Clock = { now: () => new Date() };
