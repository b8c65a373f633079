// `meterbox <command> --help` for every registered command: its usage, summary and every flag, exit
// 0, no database needed; unknown flags still exit 2 and point at --help.
import { spawnSync } from 'node:child_process';
import { describe, expect, it } from 'vitest';
import { COMMANDS, parseCommandLine } from '../../src/commands.js';

describe('CLI help', () => {
  it.each(Object.keys(COMMANDS))('%s --help prints its usage and every flag', (name) => {
    const line = parseCommandLine([...name.split(' '), '--help']);
    expect(line).toMatchObject({ kind: 'exit', code: 0, stream: 'stdout' });
    if (line.kind !== 'exit') return;
    const command = COMMANDS[name]!;
    expect(line.text).toContain(`usage: meterbox ${command.usage}`);
    expect(line.text).toContain(command.summary);
    for (const flag of Object.keys(command.options ?? {})) expect(line.text).toContain(`--${flag}`);
    expect(parseCommandLine([...name.split(' '), '-h'])).toEqual(line);
  });

  it('lists every command with `help`, and one command with `help <command>`', () => {
    const all = parseCommandLine(['help']);
    for (const name of Object.keys(COMMANDS)) expect(all.kind === 'exit' && all.text).toContain(name);
    expect(parseCommandLine(['help', 'outbox', 'list'])).toEqual(
      parseCommandLine(['outbox', 'list', '--help']),
    );
  });

  const groups = [
    ...new Set(
      Object.keys(COMMANDS)
        .filter((n) => n.includes(' '))
        .map((n) => n.split(' ')[0]!),
    ),
  ];

  it.each(groups)('%s --help lists the commands of the group', (group) => {
    const line = parseCommandLine([group, '--help']);
    expect(line).toMatchObject({ kind: 'exit', code: 0, stream: 'stdout' });
    const members = Object.keys(COMMANDS).filter((n) => n.startsWith(`${group} `));
    for (const name of members) expect(line.kind === 'exit' && line.text).toContain(`  ${name} `);
    expect(parseCommandLine([group])).toEqual(line);
    expect(parseCommandLine(['help', group])).toEqual(line);
    const wrong = parseCommandLine([group, 'nope']);
    expect(wrong).toMatchObject({ kind: 'exit', code: 2, stream: 'stderr' });
    expect(wrong.kind === 'exit' && wrong.text).toContain(`unknown command '${group} nope'`);
  });

  it('names the organization --organization in every command, with --org as its alias', () => {
    for (const [name, command] of Object.entries(COMMANDS)) {
      expect(Object.keys(command.options ?? {}), name).not.toContain('org');
      expect(command.usage, name).not.toMatch(/--org\b(?!anization)/);
    }
    const id = '00000000-0000-4000-8000-000000000001';
    for (const alias of [['--org', id], [`--org=${id}`], ['--organization', id]]) {
      expect(parseCommandLine(['key', 'list', ...alias])).toMatchObject({
        kind: 'run',
        values: { organization: id },
      });
      expect(parseCommandLine(['destinations', 'parity', ...alias])).toMatchObject({
        kind: 'run',
        values: { organization: id },
      });
    }
  });

  it('answers an unknown flag with exit 2, the usage and a pointer to --help', () => {
    const line = parseCommandLine(['outbox', 'list', '--nope']);
    expect(line).toMatchObject({ kind: 'exit', code: 2, stream: 'stderr' });
    expect(line.kind === 'exit' && line.text).toMatch(/usage: meterbox outbox list[\s\S]*--help/);
  });

  it('runs as a process without a database: exit 0 and the help on stdout', () => {
    const env = { ...process.env };
    delete env.DATABASE_URL;
    const child = spawnSync(
      process.execPath,
      ['--import', 'tsx', 'src/bin/cli.ts', 'key', 'revoke', '--help'],
      {
        env,
        encoding: 'utf8',
      },
    );
    expect(child.status).toBe(0);
    expect(child.stdout).toContain('usage: meterbox key revoke');
  });
});
