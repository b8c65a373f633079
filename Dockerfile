# syntax=docker/dockerfile:1
# Multi-stage build on Node 24: compile in `build`, ship only production dependencies and the
# production entry points (server, worker, migrate, cli). Development tooling (npm start's dev mode,
# the embedded Postgres, the Stripe emulator) is neither bundled nor installed: packages/ (the
# emulator's workspace package) is not copied, and its workspace link, a development dependency of
# the root, goes with `npm prune --omit=dev`.
FROM node:24-bookworm-slim AS build
WORKDIR /app
COPY package.json package-lock.json ./
RUN npm ci --no-audit --no-fund
COPY tsconfig.json ./
COPY scripts ./scripts
COPY src ./src
COPY migrations ./migrations
RUN node scripts/build.mjs --production && npm prune --omit=dev

FROM node:24-bookworm-slim AS runtime
# The heap is bounded by the service itself (HEAP_OLD_SPACE_MB / HEAP_YOUNG_SPACE_MB, src/bin/bounded-heap.ts).
ENV NODE_ENV=production HOST=0.0.0.0 PORT=3000
WORKDIR /app
COPY --from=build /app/package.json ./
COPY --from=build /app/node_modules ./node_modules
COPY --from=build /app/dist ./dist
COPY --from=build /app/migrations ./migrations
USER node
EXPOSE 3000
CMD ["node", "dist/server.js"]
