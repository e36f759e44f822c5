import FoundationEssentials
import QCowImage

/// A JSON value with ordered keys, printed the way qemu-img prints it.
indirect enum JSON {
    case object([(String, JSON)])
    case array([JSON])
    case string(String)
    case int(Int64)
    case uint(UInt64)
    case bool(Bool)
    case null

    /// Pretty-printed with 4-space indentation, like qemu-img --output=json.
    func pretty(indent: Int = 0) -> String {
        let pad = String(repeating: " ", count: indent)
        let inner = String(repeating: " ", count: indent + 4)
        switch self {
        case .object(let pairs):
            if pairs.isEmpty { return "{}" }
            let body = pairs.map { "\(inner)\(JSON.quote($0.0)): \($0.1.pretty(indent: indent + 4))" }
            return "{\n" + body.joined(separator: ",\n") + "\n\(pad)}"
        case .array(let items):
            if items.isEmpty { return "[]" }
            let body = items.map { "\(inner)\($0.pretty(indent: indent + 4))" }
            return "[\n" + body.joined(separator: ",\n") + "\n\(pad)]"
        default:
            return compact
        }
    }

    /// On one line, with a space after ':' and ','.
    var compact: String {
        switch self {
        case .object(let pairs):
            return "{ " + pairs.map { "\(JSON.quote($0.0)): \($0.1.compact)" }.joined(separator: ", ") + "}"
        case .array(let items): return "[" + items.map(\.compact).joined(separator: ", ") + "]"
        case .string(let s): return JSON.quote(s)
        case .int(let v): return String(v)
        case .uint(let v): return String(v)
        case .bool(let b): return b ? "true" : "false"
        case .null: return "null"
        }
    }

    static func quote(_ s: String) -> String {
        var out = "\""
        for scalar in s.unicodeScalars {
            switch scalar {
            case "\"": out += "\\\""
            case "\\": out += "\\\\"
            case "\n": out += "\\n"
            case "\r": out += "\\r"
            case "\t": out += "\\t"
            default:
                if scalar.value < 0x20 {
                    out += String(printf: "\\u%04x", scalar.value)
                } else {
                    out.unicodeScalars.append(scalar)
                }
            }
        }
        return out + "\""
    }
}

/// "0x1234" as qemu-img map's human output prints offsets.
func hex(_ v: UInt64) -> String { "0x" + String(v, radix: 16) }
