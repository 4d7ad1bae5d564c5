from tests.redis_server import LocalRedis


def test_local_server_answers_and_restarts_on_same_port():
    srv = LocalRedis().start()
    try:
        import redis

        c = redis.Redis.from_url(srv.url)
        c.set("k", "v")
        port = srv.port
        srv.kill()
        srv.start()
        assert srv.port == port
        assert redis.Redis.from_url(srv.url).ping()
    finally:
        srv.close()
