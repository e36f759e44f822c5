import FoundationEssentials
import Glibc

/// The calendar fields of an instant in UTC or in the process's local zone (TZ, else
/// /etc/localtime), from the C library and its zone database. Foundation's Calendar, TimeZone
/// and date formatters know named zones only through ICU, whose 30 MB of data the binary
/// does without.
public struct CivilTime {
    private var fields = tm()

    public init(_ date: Date, localTime: Bool = false) {
        self.init(seconds: time_t(date.timeIntervalSince1970.rounded(.down)), localTime: localTime)
    }

    public init(seconds: time_t, localTime: Bool = false) {
        var seconds = seconds
        if localTime {
            tzset()
            localtime_r(&seconds, &fields)
        } else {
            gmtime_r(&seconds, &fields)
        }
    }

    /// The fields as strftime(3) writes them: `%Y-%m-%dT%H:%M:%SZ`, `%G%V` (ISO week-year and week), …
    public func text(_ pattern: String) -> String {
        var buffer = [CChar](repeating: 0, count: 64)
        var copy = fields
        let length = strftime(&buffer, buffer.count, pattern, &copy)
        return String(decoding: buffer[..<length].map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }

    /// The fields of a pattern of digits only (`%Y%m%d`, `%G%V`, `%Y%m`) as one number.
    public func number(_ pattern: String) -> Int { Int(text(pattern)) ?? 0 }
}
