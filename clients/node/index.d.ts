// Typings of @event-router/worker (hand-written; the package is plain CommonJS).
// Contract: docs/worker-protocol.md, protocol version 1.

/** Metadata of the event being handled; fields the event lacks are null. */
export interface EventContext {
  /** The daemon's id of this delivery (not the event id). */
  readonly id: number;
  readonly eventType: string | null;
  readonly eventId: string | null;
  readonly aggregateId: string | null;
  readonly aggregateType: string | null;
  readonly correlationId: string | null;
  readonly routingKey: string | null;
  readonly exchange: string | null;
  readonly queue: string | null;
  /** 1 on the first delivery, counting the router's retries. */
  readonly attempt: number | null;
  readonly redelivered: boolean | null;
  /** The handler's name in the router's config (from the hello). */
  readonly handler: string | null;
  /**
   * Publishes a follow-up event once the handler resolves (sent with the ack;
   * dropped if the handler throws). The daemon fills the envelope. Throws a
   * TypeError on a bad argument, an Error once the event has been answered.
   */
  emit(eventType: string, payload?: Record<string, unknown>, options?: EmitOptions): void;
}

export interface EmitOptions {
  aggregateId?: string;
  aggregateType?: string;
  /** Default: the event type. */
  routingKey?: string;
}

/**
 * A handler as an amqplib consumer registers it: resolve (or return) to ack,
 * throw to retry. Its return value is ignored.
 */
export type Handler<T = any> = (eventData: T, ctx: EventContext) => unknown;

export interface RetryOptions {
  /** Least wait before the next attempt, in milliseconds. */
  after?: number;
  /** Short code, [A-Za-z0-9_.-], at most 64 bytes (others become '_'). Default handler_failed. */
  reason?: string;
  /** Text for x-death-detail, cut at 1 KiB. */
  detail?: string;
}

/** Throw to retry the event, optionally after a delay. */
export class Retry extends Error {
  constructor(options?: RetryOptions);
  readonly after: number | undefined;
  readonly reason: string;
  readonly detail: string | undefined;
}

/** Throw to send the event to the dead-letter queue at once. */
export class DeadLetter extends Error {
  /** reason: default handler_rejected; detail: cut at 1 KiB. */
  constructor(reason?: string, detail?: string);
  readonly reason: string;
  readonly detail: string | undefined;
}

/** The hello message the daemon starts with. */
export interface Hello {
  type: 'hello';
  protocol: number;
  handler?: string;
  queue?: string;
  concurrency?: number;
  [key: string]: unknown;
}

export class Worker {
  constructor();
  /**
   * Routes event types matching a RabbitMQ topic pattern (`*` one word,
   * `#` zero or more) to `handler`; the first registered match wins.
   */
  registerHandler<T = any>(pattern: string, handler: Handler<T>): this;
  /** Runs after the last answer is written, before the process exits. */
  onShutdown(fn: () => unknown): this;
  /** Reads events from the daemon; resolves once the handshake is done. */
  start(): Promise<void>;
  /** The daemon's hello, once started. */
  readonly hello: Hello | null;
}

export const PROTOCOL_VERSION: 1;

/** True when `subject` (dot-separated words) matches the topic `pattern`. */
export function topicMatch(pattern: string, subject: string): boolean;
