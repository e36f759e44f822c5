import FoundationEssentials

/// QMP's JSON as the untyped values QMP's replies are read as (`[String: Any]`, `[Any]`,
/// `String`, `Int`, `UInt64` above Int's range, `Double`, `Bool`, `NSNull`-free: JSON null is
/// absent), through FoundationEssentials' JSONDecoder/JSONEncoder. Foundation's JSONSerialization
/// would link its NSObject classes and ICU (30 MB of data) into the binary.
enum QMPJSON {
    /// The value of a JSON text.
    static func value(_ data: Data) throws -> Any? {
        try JSONDecoder().decode(Value.self, from: data).untyped
    }

    /// A JSON text of `value`, made of the types `value(_:)` returns (and Int32/UInt32/Int64).
    static func data(_ value: Any) throws -> Data {
        try JSONEncoder().encode(try Value(value))
    }

    /// A non-negative JSON integer of a decoded value.
    static func uint64(_ any: Any?) -> UInt64? {
        if let v = any as? Int { return UInt64(exactly: v) }
        return any as? UInt64
    }

    private enum Value: Codable {
        case object([String: Value])
        case array([Value])
        case string(String)
        case int(Int)
        case uint(UInt64)
        case double(Double)
        case bool(Bool)
        case null

        init(_ any: Any) throws {
            switch any {
            case let v as [String: Any]: self = .object(try v.mapValues(Value.init))
            case let v as [Any]: self = .array(try v.map(Value.init))
            case let v as String: self = .string(v)
            case let v as Bool: self = .bool(v)
            case let v as Int: self = .int(v)
            case let v as Int64: self = .int(Int(v))
            case let v as Int32: self = .int(Int(v))
            case let v as UInt32: self = .int(Int(v))
            case let v as UInt64: self = v <= UInt64(Int.max) ? .int(Int(v)) : .uint(v)
            case let v as Double: self = .double(v)
            default:
                throw EncodingError.invalidValue(any, .init(codingPath: [], debugDescription: "not a JSON value: \(type(of: any))"))
            }
        }

        init(from decoder: Decoder) throws {
            let c = try decoder.singleValueContainer()
            if c.decodeNil() { self = .null }
            else if let v = try? c.decode(Bool.self) { self = .bool(v) }
            else if let v = try? c.decode(Int.self) { self = .int(v) }
            else if let v = try? c.decode(UInt64.self) { self = .uint(v) }
            else if let v = try? c.decode(Double.self) { self = .double(v) }
            else if let v = try? c.decode(String.self) { self = .string(v) }
            else if let v = try? c.decode([Value].self) { self = .array(v) }
            else { self = .object(try c.decode([String: Value].self)) }
        }

        func encode(to encoder: Encoder) throws {
            var c = encoder.singleValueContainer()
            switch self {
            case .object(let v): try c.encode(v)
            case .array(let v): try c.encode(v)
            case .string(let v): try c.encode(v)
            case .int(let v): try c.encode(v)
            case .uint(let v): try c.encode(v)
            case .double(let v): try c.encode(v)
            case .bool(let v): try c.encode(v)
            case .null: try c.encodeNil()
            }
        }

        var untyped: Any? {
            switch self {
            case .object(let v): return v.compactMapValues(\.untyped)
            case .array(let v): return v.compactMap(\.untyped)
            case .string(let v): return v
            case .int(let v): return v
            case .uint(let v): return v
            case .double(let v): return v
            case .bool(let v): return v
            case .null: return nil
            }
        }
    }
}
