// How the admin dashboard writes times, counts and durations: UTC to the minute, en-US digits,
// an em dash for nothing.

export const fmtTime = (d: Date | string | null): string =>
  d === null ? '—' : `${(typeof d === 'string' ? d : d.toISOString()).slice(0, 16).replace('T', ' ')}Z`;
export const fmtNum = (n: number | null | undefined): string =>
  n === null || n === undefined ? '—' : n.toLocaleString('en-US');

export function fmtAge(seconds: number | null): string {
  if (seconds === null) return 'none';
  if (seconds < 90) return `${Math.round(seconds)} s`;
  if (seconds < 5400) return `${Math.round(seconds / 60)} min`;
  if (seconds < 172_800) return `${(seconds / 3600).toFixed(1)} h`;
  return `${(seconds / 86_400).toFixed(1)} d`;
}

export function fmtMs(ms: number): string {
  return ms < 1000 ? `${Math.round(ms)} ms` : `${(ms / 1000).toFixed(1)} s`;
}
