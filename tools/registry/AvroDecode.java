// The tests' independent reader of Avro that cdc-lake writes: each value is decoded by
// Confluent's own AvroConverter (the class a Kafka Connect sink runs, fetching the writer schema
// from the registry by the id in the framing) and printed as Kafka's JsonConverter renders it,
// {schema, payload}, one JSON line per value. No cdc-lake code is involved.
//
// Usage: java -cp 'libs/*:classes' AvroDecode <registry-url> <topic>
//   stdin: one base64 value per line; stdout: one JSON line per value, or
//   {"error": "..."} when the converter refuses it.
import io.confluent.connect.avro.AvroConverter;
import java.io.BufferedReader;
import java.io.InputStreamReader;
import java.nio.charset.StandardCharsets;
import java.util.Base64;
import java.util.Map;
import org.apache.kafka.connect.data.SchemaAndValue;
import org.apache.kafka.connect.json.JsonConverter;

public class AvroDecode {
    public static void main(String[] args) throws Exception {
        if (args.length != 2) {
            System.err.println("usage: AvroDecode <registry-url> <topic>");
            System.exit(2);
        }
        AvroConverter avro = new AvroConverter();
        avro.configure(Map.of("schema.registry.url", args[0]), false);
        JsonConverter json = new JsonConverter();
        json.configure(Map.of("schemas.enable", "true"), false);
        BufferedReader in = new BufferedReader(new InputStreamReader(System.in, StandardCharsets.UTF_8));
        String line;
        while ((line = in.readLine()) != null) {
            if (line.isEmpty()) continue;
            try {
                SchemaAndValue decoded = avro.toConnectData(args[1], Base64.getDecoder().decode(line));
                byte[] out = json.fromConnectData(args[1], decoded.schema(), decoded.value());
                System.out.println(new String(out, StandardCharsets.UTF_8));
            } catch (RuntimeException e) {
                String message = String.valueOf(e.getMessage()).replace("\\", "\\\\").replace("\"", "\\\"");
                System.out.println("{\"error\": \"" + e.getClass().getSimpleName() + ": " + message + "\"}");
            }
        }
    }
}
