-- Chat messages of every room, in the order instances wrote them (id). A message is identified
-- by the process that accepted it (origin, random per start) and its per-room seq there, so a
-- write retried after a lost reply is not stored twice.
CREATE TABLE room_messages (
    id         bigserial   PRIMARY KEY,
    room       text        NOT NULL,
    origin     bigint      NOT NULL,
    seq        bigint      NOT NULL,
    user_name  text        NOT NULL,
    text       text        NOT NULL,
    server     text        NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (origin, room, seq)
);

-- Joins read a room's latest messages.
CREATE INDEX room_messages_room_id ON room_messages (room, id DESC);
